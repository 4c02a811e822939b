// proxy.go is the readiness proxy: the app's health verdict until the pod
// drains, then 503; and GET /drain, the app's preStop, held until the stopper is done.

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"
)

const proxyHelp = `usage: wsdrain proxy [flags]

Answers the readinessProbe with the status of --health-url until the stopper
writes "drain" to --fifo, then 503; holds GET /drain (the app's preStop) until
the stopper is done; serves /metrics. At most 256 connections, 32 per address.

example:
  wsdrain proxy --listen :8081 --health-url http://127.0.0.1:8080/healthz --fifo /run/wsdrain/drain.fifo
`

// defaultMemoryLimit keeps the runtime under the sidecar's 64 MiB limit
// (k8s.yaml), which the stopper shares; GOMEMLIMIT overrides it.
const defaultMemoryLimit = 24 << 20

type proxyConfig struct {
	calls          // for /metrics
	listen         string
	healthURL      *url.URL
	fifo           string
	healthTimeout  time.Duration
	drainStartWait time.Duration
}

func parseProxyFlags(args []string, stdout io.Writer) (proxyConfig, error) {
	fs := flag.NewFlagSet("proxy", flag.ContinueOnError)
	listen := fs.String("listen", ":8081", "the `address` to serve probes on")
	health := fs.String("health-url", "http://127.0.0.1:8080/healthz", "the app's health endpoint, the only `URL` the proxy ever asks")
	fifo := fs.String("fifo", "/run/wsdrain/drain.fifo", "the drain `pipe`, created (mode 0600) if missing, with the drain state beside it; on an emptyDir that only the sidecar mounts")
	timeout := durationFlag{d: 800 * time.Millisecond}
	startWait := durationFlag{d: 30 * time.Second, allowZero: true}
	fs.Var(&timeout, "health-timeout", "wait this `duration` at most for the app's answer; below the kubelet's 1s probe timeout")
	fs.Var(&startWait, "drain-start-wait", "GET /drain answers anyway when no drain began within this `duration`: a preStop also runs when only the app restarts; 0 waits for ever")
	flags := addCallFlags(fs)
	if err := parseFlags(fs, proxyHelp, args, stdout); err != nil {
		return proxyConfig{}, err
	}
	c, err := flags.calls("proxy")
	if err != nil {
		return proxyConfig{}, err
	}
	u, err := url.Parse(*health)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return proxyConfig{}, usageError{fmt.Errorf("proxy: invalid value %q for flag --health-url: want an absolute http(s) URL such as http://127.0.0.1:8080/healthz", *health)}
	}
	_, port, err := net.SplitHostPort(*listen)
	if err != nil || new(portFlag).Set(port) != nil {
		return proxyConfig{}, usageError{fmt.Errorf("proxy: invalid value %q for flag --listen: want HOST:PORT or :PORT with a port from 1 to 65535", *listen)}
	}
	if *fifo == "" {
		return proxyConfig{}, usageError{errors.New("proxy: flag --fifo must not be empty")}
	}
	return proxyConfig{calls: c, listen: *listen, healthURL: u, fifo: *fifo, healthTimeout: timeout.d, drainStartWait: startWait.d}, nil
}

// runProxy serves until ctx ends (SIGTERM), then stops as shutdown says. Its log
// and the pipe's lines share stdout: one Write a line, which os.Stdout serialises.
func runProxy(ctx context.Context, args []string, stdout io.Writer) error {
	cfg, err := parseProxyFlags(args, stdout)
	if err != nil {
		return err
	}
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(defaultMemoryLimit)
	}
	logger := slog.New(slog.NewTextHandler(stdout, nil))
	pipe, err := openFIFOReader(cfg.fifo)
	if err != nil {
		return err
	}
	defer pipe.Close()
	ln, err := net.Listen("tcp", cfg.listen)
	if err != nil {
		return err
	}
	// No idle connection: one kept open to the app's port would count as a
	// live call. Proxy is unset: never through HTTP_PROXY, the app is local.
	p := newProxy(cfg, &http.Transport{DisableKeepAlives: true, MaxResponseHeaderBytes: 16 << 10}, logger)
	go func() {
		// The pipe is closed only at shutdown: any other end means no drain can come.
		if err := readFIFO(pipe, p.pipeMessage(stdout)); !errors.Is(err, os.ErrClosed) {
			logger.Error("drain pipe stopped working: the stopper can no longer drain this pod", "err", err)
		}
	}()
	srv := &http.Server{
		Handler:           p,
		ReadHeaderTimeout: 2 * time.Second,
		ReadTimeout:       5 * time.Second,
		IdleTimeout:       5 * time.Second, // an idle connection holds a slot of maxConns
		MaxHeaderBytes:    8 << 10,
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
		// No WriteTimeout: GET /drain legitimately waits for minutes.
	}
	logger.Info("proxy started", "version", buildVersion(), "listen", ln.Addr().String(), "health_url", cfg.healthURL.String(), "fifo", cfg.fifo)
	stopped := make(chan error, 1)
	stop := context.AfterFunc(ctx, func() { stopped <- p.shutdown(srv) })
	defer stop()
	err = srv.Serve(&limitListener{Listener: ln, open: map[string][]*limitedConn{},
		refused: &quietLog{log: logger.Warn, summary: "connections closed at once: more"}})
	if !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return <-stopped
}

// proxy is the HTTP handler.
type proxy struct {
	cfg                          proxyConfig
	health                       *httputil.ReverseProxy
	log                          *slog.Logger
	draining, released, stopping chan struct{}
	drainOnce, releaseOnce       sync.Once
	lastHealth                   atomic.Int64   // last status, or -1 for an error
	waiters                      sync.WaitGroup // GET /drain on connections taken from the server
	drainLog                     *quietLog      // GET /drain may come from anyone who reaches the port
	state                        *drainState
	metrics                      http.Handler // GET /metrics
}

func newProxy(cfg proxyConfig, transport http.RoundTripper, logger *slog.Logger) *proxy {
	p := &proxy{
		cfg:      cfg,
		log:      logger,
		draining: make(chan struct{}),
		released: make(chan struct{}),
		stopping: make(chan struct{}),
		drainLog: &quietLog{log: logger.Info, summary: "app preStop: more"},
	}
	p.health = &httputil.ReverseProxy{
		// Every request goes to the one health URL, whatever its path, query
		// or headers: the proxy can reach nothing else.
		Rewrite: func(pr *httputil.ProxyRequest) {
			target := *cfg.healthURL
			pr.Out.Method, pr.Out.URL, pr.Out.Host = http.MethodGet, &target, ""
			pr.Out.Header = http.Header{"User-Agent": {"wsdrain/" + buildVersion()}}
			pr.Out.Body, pr.Out.ContentLength = nil, 0
		},
		Transport:      healthTransport{transport, cfg.healthTimeout},
		ModifyResponse: p.passStatus,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			p.noteHealth(-1, err)
			http.Error(w, "app health check failed", http.StatusServiceUnavailable)
		},
		ErrorLog: slog.NewLogLogger(logger.Handler(), slog.LevelDebug),
	}
	p.resume(filepath.Join(filepath.Dir(cfg.fifo), "wsdrain.state"))
	p.metrics = newProxyMetrics(cfg, p, logger)
	return p
}

func (p *proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.URL.Path == "/metrics":
		p.metrics.ServeHTTP(w, r)
	case r.Method != http.MethodGet && r.Method != http.MethodHead:
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
	case r.URL.Path == "/drain":
		p.waitForRelease(w, r)
	case p.isDraining():
		http.Error(w, "draining", http.StatusServiceUnavailable)
	default:
		p.health.ServeHTTP(w, r)
	}
}

func (p *proxy) isDraining() bool {
	select {
	case <-p.draining:
		return true
	default:
		return false
	}
}

// passStatus keeps the app's status, Content-Type and at most 4 KiB of its
// body: any other header (a Location) could send the kubelet elsewhere.
func (p *proxy) passStatus(resp *http.Response) error {
	p.noteHealth(resp.StatusCode, nil)
	resp.Header = http.Header{"Content-Type": resp.Header.Values("Content-Type")}
	resp.Trailer, resp.ContentLength = nil, -1
	resp.Body = struct {
		io.Reader
		io.Closer
	}{io.LimitReader(resp.Body, 4<<10), resp.Body}
	return nil
}

// healthTransport bounds the app's answer by timeout and drops the probe's
// context values: ReverseProxy's client trace there would relay 1xx headers.
type healthTransport struct {
	http.RoundTripper
	timeout time.Duration
}

func (t healthTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	ctx, cancel := context.WithTimeout(context.Background(), t.timeout)
	context.AfterFunc(r.Context(), cancel)
	return t.RoundTripper.RoundTrip(r.WithContext(ctx))
}

// noteHealth logs when the app's verdict changes, not on every probe.
func (p *proxy) noteHealth(status int, err error) {
	if old := p.lastHealth.Swap(int64(status)); old == int64(status) {
		return
	}
	switch {
	case err != nil:
		p.log.Warn("app health check failed", "err", err)
	case status >= 400:
		p.log.Warn("app reports unhealthy", "status", status)
	default:
		p.log.Info("app reports healthy", "status", status)
	}
}

// waitForRelease is the app's preStop. The kubelet ends the hook on any
// answer, so it answers only once the stopper is done, the proxy stops, or no
// drain began. A waiter costs one connection, which the listener bounds.
func (p *proxy) waitForRelease(w http.ResponseWriter, r *http.Request) {
	if r.ContentLength != 0 {
		// Go notices a client's close only once the body is read.
		w.Header().Set("Connection", "close")
		http.Error(w, "GET /drain takes no body", http.StatusBadRequest)
		return
	}
	// Go stops watching for the client's close once a byte of a pipelined
	// request arrives: take the connection and watch it ourselves.
	conn, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		http.Error(w, "cannot hold GET /drain on this connection", http.StatusInternalServerError)
		return
	}
	p.waiters.Add(1)
	defer p.waiters.Done()
	p.updateState(func() { p.state.waiters++ })
	defer p.updateState(func() { p.state.waiters-- })
	defer conn.Close()
	conn.SetDeadline(time.Time{})
	gone := make(chan struct{})
	go func() {
		// Any end of the client's side, or more than a few bytes, means it no
		// longer waits.
		io.CopyN(io.Discard, conn, 4<<10)
		close(gone)
	}()
	p.drainLog.event("waiting", "app preStop waiting", "remote", r.RemoteAddr)
	reason := p.awaitRelease(gone)
	if reason == "" {
		p.drainLog.event("gave_up", "app preStop gave up waiting", "remote", r.RemoteAddr)
		return
	}
	p.drainLog.event("released", "app preStop released", "reason", reason)
	body := reason + "\n"
	head := fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nConnection: close\r\n\r\n", len(body))
	if r.Method == http.MethodHead {
		body = ""
	}
	conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(conn, head+body)
}

func (p *proxy) awaitRelease(gone <-chan struct{}) string {
	draining := p.draining
	var noDrain <-chan time.Time
	if p.cfg.drainStartWait > 0 {
		noDrain = time.After(p.cfg.drainStartWait)
	}
	for {
		select {
		case <-p.released:
			return "stopper is done with the app"
		case <-p.stopping:
			return "proxy is shutting down"
		case <-gone:
			return ""
		case <-draining:
			draining, noDrain = nil, nil
		case <-noDrain:
			return "no drain began: not a pod termination"
		}
	}
}

// shutdown releases waiting preStops and stops serving within 5 s.
func (p *proxy) shutdown(srv *http.Server) error {
	close(p.stopping)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := srv.Shutdown(ctx)
	// The server does not wait for the connections GET /drain took over.
	go func() { p.waiters.Wait(); cancel() }()
	<-ctx.Done()
	p.log.Info("proxy stopped")
	if errors.Is(err, context.DeadlineExceeded) {
		return nil
	}
	return err
}
