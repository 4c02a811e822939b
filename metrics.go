// metrics.go serves GET /metrics (Prometheus text 0.0.4): calls, drain, app health, build.

package main

import (
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"sync"
	"time"
)

// countMaxAge is how old a count a scrape may get, so that a flood of scrapes costs little.
const countMaxAge = time.Second

// metricsHandler answers GET /metrics; the proxy's state comes in as functions.
type metricsHandler struct {
	port       uint16
	count      func() (tally, error) // not safe to run concurrently
	draining   func() bool
	lastHealth func() int64 // 0 before any answer, -1 for no answer
	now        func() time.Time
	log        *slog.Logger
	mu         sync.Mutex // held while counting: one count at a time
	last       tally
	lastErr    error
	at         time.Time // when last was counted
}

// newProxyMetrics counts as the stopper does; if it cannot, /metrics leaves the count out.
func newProxyMetrics(cfg proxyConfig, p *proxy, log *slog.Logger) *metricsHandler {
	src, err := openSource(cfg.calls, func(msg string, err error) { log.Warn(msg, "err", err) })
	m := &metricsHandler{port: cfg.port, count: func() (tally, error) { return tally{}, err },
		draining: p.isDraining, lastHealth: p.lastHealth.Load, now: time.Now, log: log}
	if err != nil {
		log.Error("metrics: cannot count connections; wsdrain_connections left out", "err", err)
		return m
	}
	log.Info("metrics: counting calls", "target_port", cfg.port, "counts_from", src.name(), "not_calls", cfg.exclude.String())
	m.count = func() (tally, error) { return src.established(cfg.port, cfg.exclude) }
	return m
}

func (m *metricsHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		w.Header().Set("Allow", "GET")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	if t, err := m.calls(); err == nil {
		gauge(w, "wsdrain_connections", "Calls on the app's port now: ESTABLISHED connections less those that --ignore-peer and --ignore-idle leave out.", fmt.Sprintf(`{port="%d"}`, m.port), t.calls)
	}
	status := m.lastHealth()
	gauge(w, "wsdrain_draining", "1 once the stopper has begun the drain and readiness answers 503.", "", m.draining())
	gauge(w, "wsdrain_app_healthy", "1 when the app's last health check answered 200-399; 0 before the first one.", "", status >= 200 && status < 400)
	gauge(w, "wsdrain_build_info", "The wsdrain version, as the value of the version label.", fmt.Sprintf("{version=%q}", buildVersion()), 1)
}

// calls is the last count if younger than countMaxAge, else a new one; a failure is logged when it changes.
func (m *metricsHandler) calls() (tally, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.now().Sub(m.at) < countMaxAge {
		return m.last, m.lastErr
	}
	t, err := m.count()
	if err != nil && fmt.Sprint(err) != fmt.Sprint(m.lastErr) {
		m.log.Warn("metrics: cannot count connections; wsdrain_connections left out", "err", err)
	}
	m.last, m.lastErr, m.at = t, err, m.now()
	return t, err
}

// gauge writes one gauge, HELP and TYPE lines first; true is 1, false 0.
func gauge(w io.Writer, name, help, labels string, value any) {
	if value == true {
		value = 1
	} else if value == false {
		value = 0
	}
	fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s gauge\n%s%s %v\n", name, help, name, name, labels, value)
}
