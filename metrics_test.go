package main

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// scrape asks h for /metrics as Prometheus does and returns the body.
func scrape(t *testing.T, h http.Handler, method string) (*http.Response, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(method, "/metrics", nil))
	resp := rec.Result()
	body, _ := io.ReadAll(resp.Body)
	return resp, string(body)
}

func testMetrics(count func() (tally, error), draining bool, health int64) *metricsHandler {
	return &metricsHandler{
		port: 8080, count: count, now: time.Now,
		draining: func() bool { return draining }, lastHealth: func() int64 { return health },
		log: slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
}

func TestMetricsFormat(t *testing.T) {
	old := version
	version = `v1.2.3-"rc"\1`
	t.Cleanup(func() { version = old })
	m := testMetrics(func() (tally, error) { return tally{calls: 3, excludedPeer: 1, excludedIdle: 2}, nil }, false, 200)
	resp, body := scrape(t, m, "GET")
	want := `# HELP wsdrain_connections Calls on the app's port now: ESTABLISHED connections less those that --ignore-peer and --ignore-idle leave out.
# TYPE wsdrain_connections gauge
wsdrain_connections{port="8080"} 3
# HELP wsdrain_draining 1 once the stopper has begun the drain and readiness answers 503.
# TYPE wsdrain_draining gauge
wsdrain_draining 0
# HELP wsdrain_app_healthy 1 when the app's last health check answered 200-399; 0 before the first one.
# TYPE wsdrain_app_healthy gauge
wsdrain_app_healthy 1
# HELP wsdrain_build_info The wsdrain version, as the value of the version label.
# TYPE wsdrain_build_info gauge
wsdrain_build_info{version="v1.2.3-\"rc\"\\1"} 1
`
	if body != want {
		t.Errorf("body:\n%s\nwant:\n%s", body, want)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "text/plain; version=0.0.4; charset=utf-8" {
		t.Errorf("Content-Type %q; want the text format 0.0.4", ct)
	}
}

func TestMetricsGauges(t *testing.T) {
	tests := []struct {
		name     string
		count    func() (tally, error)
		draining bool
		health   int64
		want     []string
		absent   string
	}{
		{"draining, app unhealthy", func() (tally, error) { return tally{calls: 1}, nil }, true, 503,
			[]string{`wsdrain_connections{port="8080"} 1`, "wsdrain_draining 1", "wsdrain_app_healthy 0"}, ""},
		{"no answer from the app", func() (tally, error) { return tally{}, nil }, false, -1,
			[]string{`wsdrain_connections{port="8080"} 0`, "wsdrain_app_healthy 0"}, ""},
		{"before the first probe", func() (tally, error) { return tally{}, nil }, false, 0,
			[]string{"wsdrain_app_healthy 0"}, ""},
		{"a count that failed is left out, not 0", func() (tally, error) { return tally{}, errors.New("malformed table") }, false, 204,
			[]string{"wsdrain_draining 0", "wsdrain_app_healthy 1", "# TYPE wsdrain_build_info gauge"}, "wsdrain_connections"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, body := scrape(t, testMetrics(tt.count, tt.draining, tt.health), "GET")
			if resp.StatusCode != 200 {
				t.Fatalf("status %d", resp.StatusCode)
			}
			for _, w := range tt.want {
				if !strings.Contains(body, w+"\n") {
					t.Errorf("body lacks %q:\n%s", w, body)
				}
			}
			if tt.absent != "" && strings.Contains(body, tt.absent) {
				t.Errorf("body has %q:\n%s", tt.absent, body)
			}
		})
	}
}

// TestScrapesShareOneCount: a flood of concurrent scrapes costs one count,
// counts never overlap, and a count older than countMaxAge is not reused.
func TestScrapesShareOneCount(t *testing.T) {
	var counts, inFlight, maxInFlight atomic.Int64
	clock := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var clockMu sync.Mutex
	m := testMetrics(func() (tally, error) {
		n := inFlight.Add(1)
		defer inFlight.Add(-1)
		if n > maxInFlight.Load() {
			maxInFlight.Store(n)
		}
		time.Sleep(20 * time.Millisecond) // a count at tens of thousands of connections
		return tally{calls: int(counts.Add(1))}, nil
	}, false, 200)
	m.now = func() time.Time { clockMu.Lock(); defer clockMu.Unlock(); return clock }
	var wg sync.WaitGroup
	for range 50 {
		wg.Go(func() {
			if _, body := scrape(t, m, "GET"); !strings.Contains(body, `wsdrain_connections{port="8080"} 1`+"\n") {
				t.Errorf("a concurrent scrape did not get the shared count:\n%s", body)
			}
		})
	}
	wg.Wait()
	if counts.Load() != 1 || maxInFlight.Load() != 1 {
		t.Fatalf("50 concurrent scrapes made %d counts (%d at once); want 1", counts.Load(), maxInFlight.Load())
	}
	clockMu.Lock()
	clock = clock.Add(countMaxAge)
	clockMu.Unlock()
	if _, body := scrape(t, m, "GET"); !strings.Contains(body, `wsdrain_connections{port="8080"} 2`) || counts.Load() != 2 {
		t.Fatalf("a scrape %v later was given the old count (%d counts):\n%s", countMaxAge, counts.Load(), body)
	}
}

// TestProxyServesMetrics runs the real proxy: /metrics counts the app's
// connections with the flags' exclusions, answers GET only, keeps answering
// while draining, and never asks the app; other paths stay the verdict.
func TestProxyServesMetrics(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("counting connections needs Linux")
	}
	app := newFakeApp(t)
	_, appPort, _ := net.SplitHostPort(app.Listener.Addr().String())
	for _, local := range []string{"127.0.0.1", "127.0.0.1", "127.0.0.2"} {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(local)}}
		c, err := d.Dial("tcp", app.Listener.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
	}
	waitFor(t, "the app to accept 3 connections", func() bool { return app.open.Load() == 3 })
	p := startProxy(t, app.URL+"/healthz", filepath.Join(t.TempDir(), "drain.fifo"),
		"--target-port", appPort, "--ignore-peer", "127.0.0.2")
	hits := app.hits.Load()
	resp, err := http.Get(p.url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if want := `wsdrain_connections{port="` + appPort + `"} 2` + "\n"; resp.StatusCode != 200 || !strings.Contains(string(body), want) {
		t.Fatalf("GET /metrics: %d\n%s\nwant %q (3 connections, one from the ignored peer)", resp.StatusCode, body, want)
	}
	for _, m := range []string{"HEAD", "POST"} {
		if got := status(t, m, p.url+"/metrics"); got != http.StatusMethodNotAllowed {
			t.Errorf("%s /metrics: %d, want 405", m, got)
		}
	}
	if app.hits.Load() != hits {
		t.Errorf("a scrape asked the app %d times; want never", app.hits.Load()-hits)
	}
	if got := status(t, "GET", p.url+"/metricsx"); got != 200 {
		t.Errorf("GET /metricsx: %d; want the app's verdict, 200", got)
	}
	p.send(t, "drain")
	waitFor(t, "wsdrain_draining 1", func() bool {
		resp, err := http.Get(p.url + "/metrics")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode == 200 && strings.Contains(string(b), "wsdrain_draining 1\n")
	})
	if !strings.Contains(p.out.String(), `not_calls="peers in 127.0.0.2/32"`) || !strings.Contains(p.out.String(), "target_port="+appPort) {
		t.Errorf("the proxy's log does not say what /metrics counts:\n%s", p.out)
	}
}
