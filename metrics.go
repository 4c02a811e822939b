// metrics.go serves GET /metrics (Prometheus text format 0.0.4): the calls on
// the app's port counted as the stopper counts them, the drain, the app's last
// health verdict and the build. A scrape never asks the app anything.

package main

import (
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"
)

// countMaxAge is how old a count a scrape may be given: counts run one at a
// time and at most once per countMaxAge, so a flood of scrapes costs little.
const countMaxAge = time.Second

// metricsHandler answers GET /metrics; the proxy's state comes in as functions.
type metricsHandler struct {
	port       uint16
	count      func() (tally, error) // not safe to run concurrently
	draining   func() bool
	lastHealth func() int64 // 0 before any answer, -1 for no answer
	now        func() time.Time
	log        *slog.Logger

	mu      sync.Mutex // held while counting: one count at a time
	last    tally
	lastErr error
	at      time.Time // when last was counted
}

// newProxyMetrics counts through the source the flags pick; where it cannot
// be opened, the proxy still serves probes and /metrics leaves the count out.
func newProxyMetrics(cfg proxyConfig, p *proxy, log *slog.Logger) *metricsHandler {
	m := &metricsHandler{port: cfg.port, draining: p.isDraining, lastHealth: p.lastHealth.Load, now: time.Now, log: log}
	src, err := openSource(cfg.calls, func(msg string, err error) { log.Warn(msg, "err", err) })
	if err != nil {
		log.Error("metrics: cannot count connections; wsdrain_connections left out", "err", err)
		m.count = func() (tally, error) { return tally{}, err }
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
	t, err := m.calls()
	var b strings.Builder
	if err == nil {
		gauge(&b, "wsdrain_connections", "Calls on the app's port now: ESTABLISHED connections less those that --ignore-peer and --ignore-idle leave out.",
			fmt.Sprintf(`port="%d"`, m.port), t.calls)
	}
	draining, healthy := 0, 0
	if m.draining() {
		draining = 1
	}
	if status := m.lastHealth(); status >= 200 && status < 400 {
		healthy = 1
	}
	gauge(&b, "wsdrain_draining", "1 once the stopper has begun the drain and readiness answers 503.", "", draining)
	gauge(&b, "wsdrain_app_healthy", "1 when the app's last health check answered 200-399; 0 before the first one.", "", healthy)
	gauge(&b, "wsdrain_build_info", "The wsdrain version, as the value of the version label.",
		`version="`+labelEscaper.Replace(buildVersion())+`"`, 1)
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	fmt.Fprint(w, b.String())
}

// calls is the last count if younger than countMaxAge, else a new one; a
// failure is logged when it changes.
func (m *metricsHandler) calls() (tally, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.at.IsZero() && m.now().Sub(m.at) < countMaxAge {
		return m.last, m.lastErr
	}
	t, err := m.count()
	if err != nil && (m.lastErr == nil || err.Error() != m.lastErr.Error()) {
		m.log.Warn("metrics: cannot count connections; wsdrain_connections left out", "err", err)
	}
	m.last, m.lastErr, m.at = t, err, m.now()
	return t, err
}

// gauge writes one gauge with its HELP and TYPE lines.
func gauge(b *strings.Builder, name, help, labels string, value int) {
	fmt.Fprintf(b, "# HELP %s %s\n# TYPE %s gauge\n", name, help, name)
	if labels != "" {
		labels = "{" + labels + "}"
	}
	fmt.Fprintf(b, "%s%s %d\n", name, labels, value)
}

var labelEscaper = strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)
