// proxy.go is the readiness proxy: it passes the app's health verdict to the
// kubelet until the stopper says the pod is draining, then answers 503, and it
// holds the app's preStop (GET /drain) until the stopper is done.

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
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

const proxyHelp = `usage: wsdrain proxy [flags]

Answers the readinessProbe with the status of --health-url until the stopper
writes "drain" to --fifo, then 503. GET /drain (the app's preStop) answers once
the stopper is done; GET /metrics serves the count and state. At most 256
connections, 32 per address; the drain state is kept beside --fifo.

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
	fifo := fs.String("fifo", "/run/wsdrain/drain.fifo", "the drain `pipe`, created (mode 0600) if missing; on an emptyDir that only the sidecar mounts")
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
	u, err := parseHealthURL(*health)
	if err != nil {
		return proxyConfig{}, err
	}
	_, port, err := net.SplitHostPort(*listen)
	if n, perr := strconv.Atoi(port); err != nil || perr != nil || n < 1 || n > 65535 {
		return proxyConfig{}, usageError{fmt.Errorf("proxy: invalid value %q for flag --listen: want HOST:PORT or :PORT with a port from 1 to 65535", *listen)}
	}
	if *fifo == "" {
		return proxyConfig{}, usageError{errors.New("proxy: flag --fifo must not be empty")}
	}
	return proxyConfig{calls: c, listen: *listen, healthURL: u, fifo: *fifo, healthTimeout: timeout.d, drainStartWait: startWait.d}, nil
}

// runProxy serves until ctx is cancelled (SIGTERM), then releases any
// waiting preStop and shuts down within a few seconds.
func runProxy(ctx context.Context, args []string, stdout io.Writer) error {
	cfg, err := parseProxyFlags(args, stdout)
	if err != nil {
		return err
	}
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(defaultMemoryLimit)
	}
	out := &lockedWriter{w: stdout}
	logger := slog.New(slog.NewTextHandler(out, nil))
	pipe, err := openFIFOReader(cfg.fifo)
	if err != nil {
		return err
	}
	defer pipe.Close()
	ln, err := net.Listen("tcp", cfg.listen)
	if err != nil {
		return err
	}
	p := newProxy(cfg, newHealthTransport(cfg.healthTimeout), logger)
	p.resume(filepath.Join(filepath.Dir(cfg.fifo), "wsdrain.state"))
	p.metrics = newProxyMetrics(cfg, p, logger)
	go func() {
		// The pipe is closed only at shutdown; any other end means no drain
		// can arrive any more, which a person must hear about.
		if err := readFIFO(pipe, p.pipeMessage(out)); !errors.Is(err, os.ErrClosed) {
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
	logger.Info("proxy started", "version", buildVersion(), "listen", ln.Addr().String(),
		"health_url", cfg.healthURL.String(), "fifo", cfg.fifo)
	serveErr := make(chan error, 1)
	go func() {
		serveErr <- srv.Serve(&limitListener{Listener: ln, open: map[string]int{},
			refused: &quietLog{log: logger.Warn, summary: "connections closed at once: more"}})
	}()
	select {
	case err := <-serveErr:
		return err
	case <-ctx.Done():
	}
	return p.shutdown(srv)
}

// proxy is the HTTP handler.
type proxy struct {
	cfg    proxyConfig
	health *httputil.ReverseProxy
	log    *slog.Logger

	draining, released, stopping     chan struct{}
	drainOnce, releaseOnce, stopOnce sync.Once
	lastHealth                       atomic.Int64   // last status, or -1 for an error
	waiters                          sync.WaitGroup // GET /drain on connections taken from the server
	drainLog                         *quietLog      // GET /drain may come from anyone who reaches the port
	state                            *drainState
	metrics                          http.Handler // GET /metrics; nil: not served
}

func newProxy(cfg proxyConfig, transport http.RoundTripper, logger *slog.Logger) *proxy {
	p := &proxy{
		cfg:      cfg,
		log:      logger,
		draining: make(chan struct{}),
		released: make(chan struct{}),
		stopping: make(chan struct{}),
		drainLog: &quietLog{log: logger.Info, summary: "app preStop: more"},
		state:    &drainState{},
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
		Transport:      withoutTrace{transport},
		ModifyResponse: p.passStatus,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			p.noteHealth(-1, err)
			http.Error(w, "app health check failed", http.StatusServiceUnavailable)
		},
		ErrorLog: slog.NewLogLogger(logger.Handler(), slog.LevelDebug),
	}
	return p
}

// newHealthTransport asks the app with no idle connection: one kept open to
// the app's port would be counted by the stopper as a live call.
func newHealthTransport(timeout time.Duration) *http.Transport {
	return &http.Transport{
		Proxy:                  nil, // never through HTTP_PROXY: the app is local
		DialContext:            (&net.Dialer{Timeout: timeout}).DialContext,
		DisableKeepAlives:      true,
		TLSHandshakeTimeout:    timeout,
		ResponseHeaderTimeout:  timeout,
		MaxResponseHeaderBytes: 16 << 10,
	}
}

func (p *proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.URL.Path == "/metrics" && p.metrics != nil:
		p.metrics.ServeHTTP(w, r)
	case r.Method != http.MethodGet && r.Method != http.MethodHead:
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
	case r.URL.Path == "/drain":
		p.waitForRelease(w, r)
	case p.isDraining():
		http.Error(w, "draining", http.StatusServiceUnavailable)
	default:
		ctx, cancel := context.WithTimeout(r.Context(), p.cfg.healthTimeout)
		defer cancel()
		p.health.ServeHTTP(w, r.WithContext(ctx))
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
	contentType := resp.Header.Get("Content-Type")
	resp.Header = http.Header{}
	if contentType != "" {
		resp.Header.Set("Content-Type", contentType)
	}
	resp.Trailer = nil
	resp.ContentLength = -1
	resp.Body = struct {
		io.Reader
		io.Closer
	}{io.LimitReader(resp.Body, 4<<10), resp.Body}
	return nil
}

// withoutTrace drops the probe's context values but keeps its deadline and
// cancellation: ReverseProxy puts a client trace there that would copy the
// app's 1xx responses, with their headers, to the kubelet.
type withoutTrace struct{ http.RoundTripper }

func (t withoutTrace) RoundTrip(r *http.Request) (*http.Response, error) {
	return t.RoundTripper.RoundTrip(r.WithContext(cancelOnly{r.Context()}))
}

type cancelOnly struct{ parent context.Context }

func (c cancelOnly) Deadline() (time.Time, bool) { return c.parent.Deadline() }
func (c cancelOnly) Done() <-chan struct{}       { return c.parent.Done() }
func (c cancelOnly) Err() error                  { return c.parent.Err() }
func (c cancelOnly) Value(any) any               { return nil }

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
	gone, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		// Any end of the client's side, or more than a few bytes, means it no
		// longer waits.
		io.CopyN(io.Discard, conn, 4<<10)
		cancel()
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

func (p *proxy) awaitRelease(ctx context.Context) string {
	draining := p.draining
	var noDrain <-chan time.Time
	if p.cfg.drainStartWait > 0 {
		t := time.NewTimer(p.cfg.drainStartWait)
		defer t.Stop()
		noDrain = t.C
	}
	for {
		select {
		case <-p.released:
			return "stopper is done with the app"
		case <-p.stopping:
			return "proxy is shutting down"
		case <-ctx.Done():
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
	p.stopOnce.Do(func() { close(p.stopping) })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := srv.Shutdown(ctx)
	// The server does not wait for the connections GET /drain took over.
	answered := make(chan struct{})
	go func() { p.waiters.Wait(); close(answered) }()
	select {
	case <-answered:
	case <-ctx.Done():
	}
	p.log.Info("proxy stopped")
	if errors.Is(err, context.DeadlineExceeded) {
		return nil
	}
	return err
}

// lockedWriter keeps the proxy's log lines and the copied pipe lines whole.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
