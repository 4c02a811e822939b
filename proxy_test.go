package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// testProxy is a real "wsdrain proxy" run in-process on a free port.
type testProxy struct {
	url    string
	fifo   string
	out    *syncBuffer
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
}

func startProxy(t *testing.T, healthURL, fifo string, extra ...string) *testProxy {
	t.Helper()
	addr := freeAddr(t)
	ctx, cancel := context.WithCancel(context.Background())
	p := &testProxy{url: "http://" + addr, fifo: fifo, out: &syncBuffer{}, cancel: cancel, done: make(chan error, 1)}
	args := append([]string{"proxy", "--listen", addr, "--health-url", healthURL, "--fifo", fifo}, extra...)
	go func() { p.done <- run(ctx, args, p.out, p.out) }()
	t.Cleanup(func() { p.stop(t) })
	waitFor(t, "proxy to listen", func() bool {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	return p
}

// stop cancels the proxy as SIGTERM would and checks that it exits cleanly.
func (p *testProxy) stop(t *testing.T) {
	t.Helper()
	p.once.Do(func() {
		p.cancel()
		select {
		case err := <-p.done:
			if err != nil {
				t.Errorf("proxy exited with %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("proxy did not stop within 10s of SIGTERM")
		}
	})
}

func (p *testProxy) send(t *testing.T, msg string) {
	t.Helper()
	if err := newFIFOWriter(p.fifo).send(msg); err != nil {
		t.Fatalf("send %q: %v", msg, err)
	}
}

// status asks the proxy as the kubelet's probe would.
func status(t *testing.T, method, url string) int {
	t.Helper()
	req, _ := http.NewRequest(method, url, nil)
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// fakeApp is the app's health endpoint; it records what reaches it.
type fakeApp struct {
	*httptest.Server
	status atomic.Int64
	hits   atomic.Int64
	mu     sync.Mutex
	seen   []string
	open   atomic.Int64 // connections not yet closed
}

func newFakeApp(t *testing.T) *fakeApp {
	a := &fakeApp{}
	a.status.Store(200)
	a.Server = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.hits.Add(1)
		a.mu.Lock()
		a.seen = append(a.seen, r.Method+" "+r.URL.String())
		a.mu.Unlock()
		w.WriteHeader(int(a.status.Load()))
		fmt.Fprint(w, "app says hello")
	}))
	a.Config.ConnState = func(c net.Conn, s http.ConnState) {
		switch s {
		case http.StateNew:
			a.open.Add(1)
		case http.StateClosed, http.StateHijacked:
			a.open.Add(-1)
		}
	}
	a.Start()
	t.Cleanup(a.Close)
	return a
}

func TestProxyPassesTheAppsVerdict(t *testing.T) {
	app := newFakeApp(t)
	p := startProxy(t, app.URL+"/healthz", filepath.Join(t.TempDir(), "drain.fifo"))

	for _, want := range []int{200, 500, 204, 503} {
		app.status.Store(int64(want))
		if got := status(t, "GET", p.url+"/"); got != want {
			t.Errorf("app answers %d: proxy answered %d", want, got)
		}
	}
	app.status.Store(200)
	if got := status(t, "HEAD", p.url+"/ready"); got != 200 {
		t.Errorf("HEAD: got %d, want 200", got)
	}
	// Whatever path, query or method is asked, only the health URL is fetched.
	status(t, "GET", p.url+"/admin/../secret?url=http://example.com/")
	app.mu.Lock()
	defer app.mu.Unlock()
	for _, s := range app.seen {
		if s != "GET /healthz" {
			t.Errorf("the app was asked %q; want only GET /healthz", s)
		}
	}
}

// TestProxyPassesOnlyStatusTypeAndShortBody: a redirect or cookie from the
// app must not reach the kubelet, nor more than 4 KiB of its body.
func TestProxyPassesOnlyStatusTypeAndShortBody(t *testing.T) {
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Location", "http://example.com/")
		w.Header().Set("Set-Cookie", "a=b")
		w.WriteHeader(http.StatusFound)
		fmt.Fprint(w, strings.Repeat("x", 10<<10))
	}))
	t.Cleanup(app.Close)
	p := startProxy(t, app.URL+"/healthz", filepath.Join(t.TempDir(), "drain.fifo"))
	client := &http.Client{Timeout: 5 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := client.Get(p.url + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusFound || resp.Header.Get("Content-Type") != "application/json" {
		t.Errorf("status %d, Content-Type %q; want the app's 302 and application/json", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	if resp.Header.Get("Location") != "" || resp.Header.Get("Set-Cookie") != "" {
		t.Errorf("the app's other headers reached the probe: %v", resp.Header)
	}
	if len(body) != 4<<10 {
		t.Errorf("body of %d bytes; want the first 4 KiB", len(body))
	}
}

func TestProxyHoldsNoConnectionToTheApp(t *testing.T) {
	app := newFakeApp(t)
	p := startProxy(t, app.URL+"/healthz", filepath.Join(t.TempDir(), "drain.fifo"))
	for range 5 {
		status(t, "GET", p.url+"/")
	}
	// An idle keep-alive connection to the app's port would be counted by the
	// stopper as a call that never ends.
	waitFor(t, "connections to the app to close", func() bool { return app.open.Load() == 0 })
}

func TestProxyFailsWhenTheAppDoesNotAnswer(t *testing.T) {
	hang := make(chan struct{})
	hanging := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { <-hang }))
	t.Cleanup(func() { close(hang); hanging.Close() })
	down := "http://" + freeAddr(t) + "/healthz"

	for name, url := range map[string]string{"down": down, "hanging": hanging.URL + "/healthz"} {
		t.Run(name, func(t *testing.T) {
			p := startProxy(t, url, filepath.Join(t.TempDir(), "drain.fifo"), "--health-timeout", "300ms")
			start := time.Now()
			got := status(t, "GET", p.url+"/")
			// The kubelet gives a probe 1s by default; a verdict after that is
			// the kubelet's timeout, not ours.
			if took := time.Since(start); got < 400 || took > 900*time.Millisecond {
				t.Errorf("got %d after %v; want a failing status well within 1s", got, took)
			}
		})
	}
}

func TestProxyAnswers503OnceDraining(t *testing.T) {
	app := newFakeApp(t)
	p := startProxy(t, app.URL+"/healthz", filepath.Join(t.TempDir(), "drain.fifo"))
	if got := status(t, "GET", p.url+"/"); got != 200 {
		t.Fatalf("before the drain: %d, want 200", got)
	}
	p.send(t, "drain")
	waitFor(t, "readiness to fail", func() bool { return status(t, "GET", p.url+"/") == 503 })
	hits := app.hits.Load()
	for range 3 {
		if got := status(t, "GET", p.url+"/healthz"); got != 503 {
			t.Errorf("after the drain: %d, want 503", got)
		}
	}
	if app.hits.Load() != hits {
		t.Errorf("the app was still asked after the drain began")
	}
	if !strings.Contains(p.out.String(), "drain begun") {
		t.Errorf("the log does not say the drain began:\n%s", p.out)
	}
}

func TestProxyRefusesOtherMethods(t *testing.T) {
	app := newFakeApp(t)
	p := startProxy(t, app.URL+"/healthz", filepath.Join(t.TempDir(), "drain.fifo"))
	for _, m := range []string{"POST", "PUT", "DELETE", "OPTIONS"} {
		if got := status(t, m, p.url+"/"); got != 405 {
			t.Errorf("%s: %d, want 405", m, got)
		}
	}
	if app.hits.Load() != 0 {
		t.Errorf("a refused method reached the app")
	}
}

func TestProxySurvivesGarbageOnTheFIFO(t *testing.T) {
	app := newFakeApp(t)
	p := startProxy(t, app.URL+"/healthz", filepath.Join(t.TempDir(), "drain.fifo"))
	f, err := os.OpenFile(p.fifo, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	garbage := []string{"\x00\xff\xfe binary\n", "DRAIN now please\n", strings.Repeat("x", 100_000) + "\n", "log \x1b[2Jforged\n"}
	for _, g := range garbage {
		if _, err := f.WriteString(g); err != nil {
			t.Fatal(err)
		}
	}
	if got := status(t, "GET", p.url+"/"); got != 200 {
		t.Fatalf("garbage drained the proxy: %d", got)
	}
	f.WriteString("drain\n")
	waitFor(t, "the drain after garbage", func() bool { return status(t, "GET", p.url+"/") == 503 })
	waitFor(t, "every ignored message to be reported", func() bool { return ignoredCount(p.out.String()) == len(garbage) })
	if strings.Contains(p.out.String(), "\x1b") {
		t.Errorf("a control character reached the log")
	}
}

// TestProxyRestartAfterADrainAloneStartsReady: a drain that no preStop of
// the app's met is a restart of the sidecar only (its preStop runs the
// stopper too), not the pod's end: the pod must not stay unready for good.
func TestProxyRestartAfterADrainAloneStartsReady(t *testing.T) {
	app := newFakeApp(t)
	fifo := filepath.Join(t.TempDir(), "drain.fifo")
	first := startProxy(t, app.URL+"/healthz", fifo)
	first.send(t, "drain")
	waitFor(t, "the first proxy to drain", func() bool { return status(t, "GET", first.url+"/") == 503 })
	first.send(t, "done")
	first.stop(t)

	second := startProxy(t, app.URL+"/healthz", fifo)
	if got := status(t, "GET", second.url+"/"); got != 200 {
		t.Fatalf("a proxy restarted after a drain alone answered %d; want 200", got)
	}
}

// TestProxyRestartedDuringTerminationKeepsTheDrain: the kubelet may restart
// the sidecar while the pod terminates (KEP-4438). A drain that met the
// app's preStop is the pod's end: the restarted proxy must answer 503 from
// its first answer and hold GET /drain until the stopper is done, and one
// restarted after that must release GET /drain at once.
func TestProxyRestartedDuringTerminationKeepsTheDrain(t *testing.T) {
	app := newFakeApp(t)
	fifo := filepath.Join(t.TempDir(), "drain.fifo")
	first := startProxy(t, app.URL+"/healthz", fifo, "--drain-start-wait", "1s")
	held := getDrain(first.url)
	waitFor(t, "the app's preStop to wait", func() bool { return drainLogCount(first.out.String(), "waiting") == 1 })
	first.send(t, "drain")
	waitFor(t, "the first proxy to drain", func() bool { return status(t, "GET", first.url+"/") == 503 })
	first.stop(t)
	<-held

	second := startProxy(t, app.URL+"/healthz", fifo, "--drain-start-wait", "1s")
	if got := status(t, "GET", second.url+"/"); got != 503 {
		t.Fatalf("a proxy restarted mid-drain first answered %d; want 503", got)
	}
	released := getDrain(second.url)
	select {
	case r := <-released:
		t.Fatalf("GET /drain to a proxy restarted mid-drain answered %q before the stopper was done", r)
	case <-time.After(1500 * time.Millisecond): // past --drain-start-wait
	}
	second.send(t, "done")
	if r := <-released; !strings.HasPrefix(r, "200 stopper is done") {
		t.Fatalf("GET /drain answered %q, want 200 once the stopper is done", r)
	}
	second.stop(t)

	third := startProxy(t, app.URL+"/healthz", fifo, "--drain-start-wait", "0")
	if got := status(t, "GET", third.url+"/"); got != 503 {
		t.Errorf("a proxy restarted after done answered %d; want 503", got)
	}
	select {
	case r := <-getDrain(third.url):
		if !strings.HasPrefix(r, "200 stopper is done") {
			t.Errorf("GET /drain after done answered %q", r)
		}
	case <-time.After(5 * time.Second):
		t.Error("GET /drain to a proxy restarted after done still waiting")
	}
}

// TestProxyDrainsWithTheStateInMemory: a drain state file it may not use
// (here a symlink) leaves the state in memory, as the warning says; the
// proxy must still drain, hold GET /drain and release it, not crash.
func TestProxyDrainsWithTheStateInMemory(t *testing.T) {
	app := newFakeApp(t)
	dir := t.TempDir()
	if err := os.Symlink(filepath.Join(dir, "elsewhere"), filepath.Join(dir, "wsdrain.state")); err != nil {
		t.Fatal(err)
	}
	p := startProxy(t, app.URL+"/healthz", filepath.Join(dir, "drain.fifo"), "--drain-start-wait", "1s")
	waitFor(t, "the warning", func() bool { return strings.Contains(p.out.String(), "drain state kept in memory only") })
	drainHeldUntilDone(t, p, getDrain(p.url), 1500*time.Millisecond)
	if got := status(t, "GET", p.url+"/"); got != 503 {
		t.Errorf("readiness after the drain: %d, want 503", got)
	}
}

func TestProxyRefusesAPathThatIsNotAFIFO(t *testing.T) {
	path := filepath.Join(t.TempDir(), "drain.fifo")
	os.WriteFile(path, []byte("precious"), 0o600)
	var out syncBuffer
	err := run(context.Background(), []string{"proxy", "--listen", freeAddr(t), "--fifo", path}, &out, &out)
	if err == nil || !strings.Contains(err.Error(), "not a named pipe") {
		t.Fatalf("err = %v; want a refusal", err)
	}
	if b, _ := os.ReadFile(path); string(b) != "precious" {
		t.Fatalf("the file was changed to %q", b)
	}
}

// getDrain starts the app's preStop request and returns its result later.
func getDrain(url string) <-chan string { return getDrainWith(http.DefaultClient, url) }

func getDrainWith(client *http.Client, url string) <-chan string {
	result := make(chan string, 1)
	go func() {
		resp, err := client.Get(url + "/drain")
		if err != nil {
			result <- err.Error()
			return
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		result <- fmt.Sprintf("%d %s", resp.StatusCode, strings.TrimSpace(string(body)))
	}()
	return result
}

func TestDrainPathWaitsForTheStopper(t *testing.T) {
	app := newFakeApp(t)
	p := startProxy(t, app.URL+"/healthz", filepath.Join(t.TempDir(), "drain.fifo"), "--drain-start-wait", "1s")
	// Past -drain-start-wait (a drain began, so it must keep waiting) and
	// past the server's read and idle timeouts (5s), which must not cut it.
	drainHeldUntilDone(t, p, getDrain(p.url), 6*time.Second)
	if r := <-getDrain(p.url); !strings.HasPrefix(r, "200 ") {
		t.Errorf("a repeated GET /drain answered %q, want 200 at once", r)
	}
}

// drainHeldUntilDone starts a drain, checks that a waiting GET /drain is
// still held after hold, then reports done and checks that it is released.
func drainHeldUntilDone(t *testing.T, p *testProxy, released <-chan string, hold time.Duration) {
	t.Helper()
	p.send(t, "drain")
	select {
	case r := <-released:
		t.Fatalf("GET /drain answered %q before the stopper was done", r)
	case <-time.After(hold):
	}
	p.send(t, "done")
	select {
	case r := <-released:
		if !strings.HasPrefix(r, "200 stopper is done") {
			t.Fatalf("GET /drain answered %q, want 200 once the stopper is done", r)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("GET /drain still waiting after the stopper reported done")
	}
}

func TestDrainPathReleasedWithoutADrain(t *testing.T) {
	// The app's preStop also runs when only the app container restarts;
	// then no stopper runs and the restart must not wait for the grace period.
	app := newFakeApp(t)
	p := startProxy(t, app.URL+"/healthz", filepath.Join(t.TempDir(), "drain.fifo"), "--drain-start-wait", "300ms")
	select {
	case r := <-getDrain(p.url):
		if !strings.HasPrefix(r, "200 ") || !strings.Contains(r, "no drain") {
			t.Fatalf("GET /drain answered %q", r)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("GET /drain kept waiting with no drain begun")
	}
	if got := status(t, "GET", p.url+"/"); got != 200 {
		t.Errorf("readiness after a released /drain: %d, want 200", got)
	}
}

func TestDrainPathReleasedOnShutdown(t *testing.T) {
	app := newFakeApp(t)
	p := startProxy(t, app.URL+"/healthz", filepath.Join(t.TempDir(), "drain.fifo"), "--drain-start-wait", "0")
	released := getDrain(p.url)
	waitFor(t, "the waiter to register", func() bool { return strings.Contains(p.out.String(), "app preStop waiting") })
	p.stop(t)
	if r := <-released; !strings.HasPrefix(r, "200 ") {
		t.Fatalf("GET /drain on shutdown answered %q, want 200", r)
	}
}

func TestFIFOWriterNeverBlocks(t *testing.T) {
	dir := t.TempDir()
	if err := newFIFOWriter(filepath.Join(dir, "absent")).send("drain"); err == nil {
		t.Error("send to a missing FIFO: nil error")
	}
	path := filepath.Join(dir, "drain.fifo")
	if err := syscall.Mkfifo(path, 0o600); err != nil {
		t.Fatal(err)
	}
	err := newFIFOWriter(path).send("drain")
	if err == nil || !strings.Contains(err.Error(), "no reader") {
		t.Errorf("send with no reader: %v; want a no-reader error", err)
	}
	regular := filepath.Join(dir, "file")
	os.WriteFile(regular, nil, 0o600)
	if err := newFIFOWriter(regular).send("drain"); err == nil {
		t.Error("send to a regular file: nil error")
	}
	if b, _ := os.ReadFile(regular); len(b) != 0 {
		t.Errorf("a regular file was written: %q", b)
	}
}

// syncBuffer is a bytes.Buffer safe for a writer and a reader at once.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// freeAddr returns a loopback address nothing listens on.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// waitFor polls cond for up to 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

// TestProxyExitsZeroOnSIGTERM runs the real binary as the kubelet stops it.
func TestProxyExitsZeroOnSIGTERM(t *testing.T) {
	app := newFakeApp(t)
	addr := freeAddr(t)
	cmd := wsdrainCmd("proxy", "--listen", addr, "--health-url", app.URL+"/healthz", "--fifo", filepath.Join(t.TempDir(), "drain.fifo"))
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the proxy to answer", func() bool {
		resp, err := http.Get("http://" + addr + "/")
		if err == nil {
			resp.Body.Close()
		}
		return err == nil
	})
	cmd.Process.Signal(syscall.SIGTERM)
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("proxy exited with %v after SIGTERM, want status 0", err)
		}
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		t.Fatal("proxy still running 10s after SIGTERM")
	}
}

// drainRequest opens a connection, sends a GET /drain with extra header
// lines (and body), and returns the connection.
func drainRequest(t *testing.T, url, extra string) net.Conn {
	t.Helper()
	return drainRequestFrom(t, nil, url, extra)
}

// drainRequestFrom is drainRequest from a local address such as 127.0.0.2.
func drainRequestFrom(t *testing.T, from net.IP, url, extra string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: from}}
	c, err := d.Dial("tcp", strings.TrimPrefix(url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := io.WriteString(c, "GET /drain HTTP/1.1\r\nHost: pod\r\n"+extra); err != nil {
		t.Fatal(err)
	}
	return c
}

func TestDrainPathHoldsEveryWaiterUntilDone(t *testing.T) {
	app := newFakeApp(t)
	p := startProxy(t, app.URL+"/healthz", filepath.Join(t.TempDir(), "drain.fifo"), "--drain-start-wait", "0")
	// Hooks that ran twice, or requests from elsewhere: none may be answered
	// early, since the kubelet takes any answer as the end of the preStop.
	var waiters []<-chan string
	for range 20 {
		waiters = append(waiters, getDrain(p.url))
	}
	waitFor(t, "20 waiters", func() bool { return drainLogCount(p.out.String(), "waiting") == 20 })
	p.send(t, "drain")
	for i, w := range waiters {
		select {
		case r := <-w:
			t.Fatalf("waiter %d answered %q before the stopper was done", i, r)
		default:
		}
	}
	p.send(t, "done")
	for _, w := range waiters {
		if r := <-w; !strings.HasPrefix(r, "200 stopper is done") {
			t.Errorf("a waiter got %q, want 200 once the stopper is done", r)
		}
	}
}

func TestDrainPathRefusesABody(t *testing.T) {
	app := newFakeApp(t)
	p := startProxy(t, app.URL+"/healthz", filepath.Join(t.TempDir(), "drain.fifo"), "--drain-start-wait", "0")
	for name, extra := range map[string]string{
		"content-length": "Content-Length: 5\r\n\r\nhello",
		"chunked":        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
	} {
		t.Run(name, func(t *testing.T) {
			c := drainRequest(t, p.url, extra)
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			line, err := bufio.NewReader(c).ReadString('\n')
			if !strings.HasPrefix(line, "HTTP/1.1 400 ") {
				t.Fatalf("GET /drain with a body: %q, %v; want 400 at once", line, err)
			}
		})
	}
}

func TestDrainPathForgetsClientsThatLeft(t *testing.T) {
	app := newFakeApp(t)
	p := startProxy(t, app.URL+"/healthz", filepath.Join(t.TempDir(), "drain.fifo"), "--drain-start-wait", "0")
	// More than the proxy holds connections, sent and closed before a
	// rollout from 16 addresses, with a body Go never reads (so it does not
	// see the close) or without one (so it must see the close and free the
	// connection).
	for i := range maxConns + 8 {
		from := net.IPv4(127, 0, 1, byte(1+i%16))
		drainRequestFrom(t, from, p.url, "Content-Length: 5\r\n\r\nhello").Close()
		drainRequestFrom(t, from, p.url, "\r\n").Close()
	}
	waitFor(t, "every abandoned waiter to be freed", func() bool {
		return drainLogCount(p.out.String(), "gave_up") == maxConns+8
	})
	drainHeldUntilDone(t, p, getDrain(p.url), 500*time.Millisecond)
}

// TestDrainPathForgetsClientsThatLeftAfterOneMoreByte: once a byte of a
// next, pipelined request arrives, Go no longer watches for the client's
// close; a client that sends one and leaves must free its connection too.
func TestDrainPathForgetsClientsThatLeftAfterOneMoreByte(t *testing.T) {
	app := newFakeApp(t)
	p := startProxy(t, app.URL+"/healthz", filepath.Join(t.TempDir(), "drain.fifo"), "--drain-start-wait", "0")
	var conns []net.Conn
	for range 20 {
		conns = append(conns, drainRequest(t, p.url, "\r\n"))
	}
	waitFor(t, "20 waiters", func() bool { return drainLogCount(p.out.String(), "waiting") == 20 })
	for _, c := range conns {
		io.WriteString(c, "G")
	}
	time.Sleep(100 * time.Millisecond)
	for _, c := range conns {
		c.Close()
	}
	waitFor(t, "every abandoned waiter to be freed", func() bool {
		return drainLogCount(p.out.String(), "gave_up") == 20
	})
	drainHeldUntilDone(t, p, getDrain(p.url), 500*time.Millisecond)
}

func TestProxyPassesNo1xxFromTheApp(t *testing.T) {
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Link", "</evil.css>; rel=preload")
		w.Header().Set("X-Injected", "yes")
		w.WriteHeader(http.StatusEarlyHints)
		w.Header().Del("Link")
		w.Header().Del("X-Injected")
		w.WriteHeader(http.StatusOK)
	}))
	t.Cleanup(app.Close)
	p := startProxy(t, app.URL+"/healthz", filepath.Join(t.TempDir(), "drain.fifo"))
	c, err := net.Dial("tcp", strings.TrimPrefix(p.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET /ready HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	answer, _ := io.ReadAll(c)
	if !strings.HasPrefix(string(answer), "HTTP/1.1 200 ") {
		t.Fatalf("the probe got %q, want the app's 200 first", answer)
	}
	for _, leak := range []string{"103", "Link", "evil", "X-Injected"} {
		if strings.Contains(string(answer), leak) {
			t.Errorf("the app's 1xx reached the probe (%q):\n%s", leak, answer)
		}
	}
}

// flood opens n connections to addr from as many addresses (127.0.2.x),
// each sending send (perhaps nothing), as any client that can reach the
// proxy's port could.
func flood(t testing.TB, addr string, n, addresses int, send string) []net.Conn {
	t.Helper()
	conns := make([]net.Conn, 0, n)
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	for i := range n {
		d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 2, byte(1+i%addresses))}}
		c, err := d.Dial("tcp", addr)
		if err != nil {
			t.Fatalf("flood: %v after %d connections", err, len(conns))
		}
		io.WriteString(c, send)
		conns = append(conns, c)
	}
	return conns
}

// procStatusKiB reads a size such as VmHWM (peak RSS) from /proc/PID/status.
func procStatusKiB(t testing.TB, pid int, field string) int {
	t.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == field+":" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// TestProxySurvivesAConnectionFlood floods the real binary with idle
// keep-alive connections: it must stay well under the 64 MiB that k8s.yaml allows
// the sidecar (the stopper runs in the same container), and serve the
// kubelet again within seconds of the flood's end.
func TestProxySurvivesAConnectionFlood(t *testing.T) {
	app := newFakeApp(t)
	addr := freeAddr(t)
	fifo := filepath.Join(t.TempDir(), "drain.fifo")
	cmd := wsdrainCmd("proxy", "--listen", addr, "--health-url", app.URL+"/healthz", "--fifo", fifo, "--drain-start-wait", "0")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() })
	url := "http://" + addr
	waitFor(t, "the proxy to answer", func() bool { return probe(url) == 200 })

	// Each asks once, then idles on the kept-alive connection; from 100
	// addresses, so that together they reach maxConns.
	conns := flood(t, addr, 3000, 100, "GET /ready HTTP/1.1\r\nHost: pod\r\n\r\n")
	time.Sleep(time.Second) // let the proxy take what it will
	// 40 MiB leaves the stopper room under the 64 MiB limit; the figures
	// measured (21-30 MiB) are in BENCHMARKS.md.
	const most = 40 << 10
	if peak := procStatusKiB(t, cmd.Process.Pid, "VmHWM"); peak > most {
		t.Errorf("peak RSS under 3000 idle connections: %d KiB; want under %d KiB", peak, most)
	}
	for _, c := range conns {
		c.Close()
	}
	waitFor(t, "readiness after the flood", func() bool { return probe(url) == 200 })
	// The end of the flood frees every slot at once.
	if peak := procStatusKiB(t, cmd.Process.Pid, "VmHWM"); peak > most {
		t.Errorf("peak RSS once 3000 idle connections closed: %d KiB; want under %d KiB", peak, most)
	}
	released := getDrain(url)
	if err := newFIFOWriter(fifo).send("drain"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the drain after the flood", func() bool { return probe(url) == 503 })
	if err := newFIFOWriter(fifo).send("done"); err != nil {
		t.Fatal(err)
	}
	if r := <-released; !strings.HasPrefix(r, "200 stopper is done") {
		t.Fatalf("GET /drain after the flood: %q", r)
	}
}

// probe is one readiness probe; 0 when it got no answer within 1 s, as the
// kubelet's default timeoutSeconds.
func probe(url string) int {
	client := &http.Client{Timeout: time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Get(url + "/ready")
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

func TestProxySetsAMemoryLimitUnlessGOMEMLIMITDoes(t *testing.T) {
	before := debug.SetMemoryLimit(math.MaxInt64)
	t.Cleanup(func() { debug.SetMemoryLimit(before) })
	app := newFakeApp(t)

	t.Setenv("GOMEMLIMIT", "100MiB") // the runtime read it at start; the proxy must not override it
	startProxy(t, app.URL+"/healthz", filepath.Join(t.TempDir(), "drain.fifo")).stop(t)
	if got := debug.SetMemoryLimit(-1); got != math.MaxInt64 {
		t.Errorf("with GOMEMLIMIT set the proxy changed the memory limit to %d", got)
	}
	os.Unsetenv("GOMEMLIMIT")
	startProxy(t, app.URL+"/healthz", filepath.Join(t.TempDir(), "drain.fifo")).stop(t)
	if got := debug.SetMemoryLimit(-1); got != 24<<20 {
		t.Errorf("memory limit %d, want 24 MiB, well under the sidecar's 64 MiB in k8s.yaml", got)
	}
}

// TestProxyLeavesTheNodeRoomDuringAFlood: one address holding GET /drain
// waiters and idle connections must leave room for the kubelet, which comes
// from the node's address (127.0.0.2 here): its probe is answered within its
// 1 s timeout, and its preStop is held until the stopper is done.
func TestProxyLeavesTheNodeRoomDuringAFlood(t *testing.T) {
	app := newFakeApp(t)
	p := startProxy(t, app.URL+"/healthz", filepath.Join(t.TempDir(), "drain.fifo"), "--drain-start-wait", "0")
	addr := strings.TrimPrefix(p.url, "http://")
	flood(t, addr, maxConns+100, 1, "GET /drain HTTP/1.1\r\nHost: pod\r\n\r\n")
	flood(t, addr, 100, 1, "")
	kubeletGetsThrough(t, p)
	if !strings.Contains(p.out.String(), "connection closed at once: over the limit") {
		t.Errorf("the log does not tell of the flood:\n%s", p.out)
	}
}

// TestProxyHoldsTheKubeletsHookWhenEightAddressesFillIt: GET /drain waiters
// from eight addresses, each under its own cap, fill the proxy; the kubelet's
// probe and hook, from another address, must still get a slot.
func TestProxyHoldsTheKubeletsHookWhenEightAddressesFillIt(t *testing.T) {
	app := newFakeApp(t)
	p := startProxy(t, app.URL+"/healthz", filepath.Join(t.TempDir(), "drain.fifo"), "--drain-start-wait", "0")
	addr := strings.TrimPrefix(p.url, "http://")
	flood(t, addr, maxConns, maxConns/maxConnsPerAddress, "GET /drain HTTP/1.1\r\nHost: pod\r\n\r\n")
	waitFor(t, "the flood's waiters", func() bool { return drainLogCount(p.out.String(), "waiting") == maxConns })
	kubeletGetsThrough(t, p)
}

// kubeletGetsThrough is the kubelet, from the node's address (127.0.0.2
// here): its probe is answered with the app's 200 within its 1 s timeout,
// and its preStop is held until the stopper is done.
func kubeletGetsThrough(t *testing.T, p *testProxy) {
	t.Helper()
	node := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}
	kubelet := &http.Client{Transport: &http.Transport{DialContext: node.DialContext, DisableKeepAlives: true}}
	probe := &http.Client{Timeout: time.Second, Transport: kubelet.Transport}
	resp, err := probe.Get(p.url + "/ready")
	if err != nil {
		t.Fatalf("the node's probe during a flood: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("the node's probe during a flood: %d, want the app's 200", resp.StatusCode)
	}
	drainHeldUntilDone(t, p, getDrainWith(kubelet, p.url), 500*time.Millisecond)
}

// drainLogCount is how many GET /drain events of a kind ("waiting",
// "released", "gave_up") the proxy's log reports, counting those it summed up.
func drainLogCount(log, kind string) int {
	full := map[string]string{"waiting": "app preStop waiting", "released": "app preStop released", "gave_up": "app preStop gave up waiting"}
	n := strings.Count(log, `msg="`+full[kind]+`"`)
	for _, m := range regexp.MustCompile(`msg="app preStop: more".* `+kind+`=(\d+)`).FindAllStringSubmatch(log, -1) {
		k, _ := strconv.Atoi(m[1])
		n += k
	}
	return n
}

func TestDrainPathDoesNotFloodTheLog(t *testing.T) {
	app := newFakeApp(t)
	p := startProxy(t, app.URL+"/healthz", filepath.Join(t.TempDir(), "drain.fifo"), "--drain-start-wait", "0")
	p.send(t, "drain")
	p.send(t, "done")
	waitFor(t, "the stopper's done", func() bool { return strings.Contains(p.out.String(), "stopper is done") })
	// Anyone who reaches the port can repeat GET /drain, answered at once
	// after done: the log must keep one line for the first waiter, one for
	// its release, and sum up the rest at most once a second.
	const n = 300
	start := time.Now()
	for range n {
		if r := <-getDrain(p.url); !strings.HasPrefix(r, "200 ") {
			t.Fatalf("GET /drain after done: %q", r)
		}
	}
	seconds := int(time.Since(start)/time.Second) + 2
	waitFor(t, "every GET /drain to be told", func() bool {
		return drainLogCount(p.out.String(), "waiting") == n && drainLogCount(p.out.String(), "released") == n
	})
	if lines := strings.Count(p.out.String(), "app preStop"); lines > 2+seconds {
		t.Errorf("%d GET /drain in under %d s wrote %d log lines; want 2 and at most one a second", n, seconds, lines)
	}
}
