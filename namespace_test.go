//go:build linux

package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"
)

// TestEndToEndInNamespaces runs the real binary the way a pod does: in a
// network and PID namespace of its own, next to a dual-stack app whose
// process is not its parent, with PID 1 a process it must never signal.
// The "private-" scenarios (pidns_test.go) give the sidecar a PID namespace
// of its own, as in a pod without shareProcessNamespace.
func TestEndToEndInNamespaces(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("CI must run the namespace end-to-end test as root")
		}
		t.Skip("skipped: creating network and PID namespaces needs root (run as root, as CI does)")
	}
	for _, name := range []string{"calls", "events", "timeout", "no-fifo", "wrapper", "unreadable-master", "exclusions",
		"other-uid", "private-calls", "private-timeout"} {
		t.Run(name, func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run=^TestNamespaceScenario$", "-test.v", "-test.count=1")
			cmd.Env = append(os.Environ(), "WSDRAIN_NS_SCENARIO="+name)
			cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET | syscall.CLONE_NEWPID | syscall.CLONE_NEWNS}
			out, err := cmd.CombinedOutput()
			if err != nil || !strings.Contains(string(out), "--- PASS: TestNamespaceScenario") {
				t.Fatalf("scenario %s failed: %v\n%s", name, err, out)
			}
			t.Logf("%s", out)
		})
	}
}

// TestNamespaceScenario is the inside of TestEndToEndInNamespaces.
func TestNamespaceScenario(t *testing.T) {
	name := os.Getenv("WSDRAIN_NS_SCENARIO")
	if name == "" {
		t.Skip("runs only inside the namespaces that TestEndToEndInNamespaces creates")
	}
	enterPodLikeNamespace(t)
	pod := newNSPod(t)
	switch name {
	case "calls":
		scenarioCalls(t, pod)
	case "events":
		scenarioEvents(t, pod)
	case "timeout":
		scenarioTimeout(t, pod)
	case "no-fifo":
		scenarioNoFIFO(t, pod)
	case "wrapper":
		scenarioWrapper(t, pod)
	case "unreadable-master":
		scenarioUnreadableMaster(t, pod)
	case "exclusions":
		scenarioExclusions(t, pod)
	case "other-uid":
		scenarioOtherUID(t, pod)
	case "private-calls":
		scenarioPrivateCalls(t, pod)
	case "private-timeout":
		scenarioPrivateTimeout(t, pod)
	default:
		t.Fatalf("unknown scenario %q", name)
	}
}

// scenarioCalls: readiness fails at once, the app is left alone while any
// call is open, and is signalled within about one interval of the last one.
func scenarioCalls(t *testing.T, pod *nsPod) {
	pod.startApp(t, false)
	pod.startProxy(t)
	ipv4, ipv6 := pod.call(t, "127.0.0.1:8080"), pod.call(t, "[::1]:8080")
	for _, source := range []string{"netlink", "proc"} {
		out, err := wsdrainCmd("count", "--target-port", "8080", "--source", source).Output()
		if err != nil || strings.TrimSpace(string(out)) != "2" {
			t.Fatalf("wsdrain count --source %s printed %q (%v); want 2 (an IPv4 call lives in tcp6)", source, out, err)
		}
	}
	// sock_diag needs no privilege in the caller's own network namespace.
	nobody := exec.Command(copyForAnyUser(t, os.Args[0]), "count", "--target-port", "8080", "--source", "netlink")
	nobody.Env = append(os.Environ(), "WSDRAIN_TEST_ROLE=wsdrain")
	nobody.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	if out, err := nobody.Output(); err != nil || strings.TrimSpace(string(out)) != "2" {
		t.Fatalf("wsdrain count --source netlink as uid 65534 printed %q (%v); want 2", out, err)
	}
	preStop := getDrain("http://127.0.0.1:8081")
	stopper := pod.startStopper(t, "--interval", "200ms", "--min-drain", "0s")

	began := time.Now()
	waitFor(t, "readiness 503", func() bool { return status(t, "GET", "http://127.0.0.1:8081/") == 503 })
	t.Logf("readiness 503 after %v", time.Since(began).Round(time.Millisecond))
	if d := time.Since(began); d > 2*time.Second {
		t.Errorf("readiness turned 503 only after %v", d)
	}

	time.Sleep(1500 * time.Millisecond)
	pod.assertNotSignalled(t, "two calls open")
	ipv4.echo(t)
	ipv4.Close()
	time.Sleep(time.Second)
	pod.assertNotSignalled(t, "one call open")
	select {
	case r := <-preStop:
		t.Fatalf("the app's preStop returned %q while a call was open", r)
	default:
	}
	ipv6.echo(t)
	ipv6.Close()
	pod.waitSignalledSoonAfter(t, time.Now(), 1200*time.Millisecond, "about one 200ms interval")
	pod.waitStopper(t, stopper, 0)
	if r := <-preStop; !strings.HasPrefix(r, "200 ") {
		t.Errorf("the app's preStop got %q, want 200", r)
	}
	pod.proxyLogHas(t, "counts_from=netlink", "count=2", "count=1", "count=0",
		fmt.Sprintf(`msg="signalled app" source=stopper pid=%d`, pod.appPID), "signal=SIGTERM")
}

// scenarioEvents: with a 5s poll, the kernel's destroy event on the last
// call gets the app signalled well under a second after that call closed.
func scenarioEvents(t *testing.T, pod *nsPod) {
	pod.startApp(t, false)
	pod.startProxy(t)
	call := pod.call(t, "[::1]:8080")
	stopper := pod.startStopper(t, "--interval", "5s", "--min-drain", "0s")
	waitFor(t, "the stopper to count the call", func() bool { return strings.Contains(pod.proxyOut.String(), "count=1") })
	call.Close()
	pod.waitSignalledSoonAfter(t, time.Now(), 500*time.Millisecond, "well under the 5s poll (destroy events)")
	pod.waitStopper(t, stopper, 0)
	pod.proxyLogHas(t, "counts_from=netlink events=on")
}

// scenarioTimeout: a call that outlives -timeout; the app still gets SIGTERM.
func scenarioTimeout(t *testing.T, pod *nsPod) {
	pod.startApp(t, false)
	pod.startProxy(t)
	call := pod.call(t, "127.0.0.1:8080")
	began := time.Now()
	stopper := pod.startStopper(t, "--interval", "200ms", "--min-drain", "0s", "--timeout", "2s")
	signalled := pod.waitSignalled(t)
	t.Logf("app signalled %v after the stopper started", signalled.Sub(began).Round(time.Millisecond))
	if d := signalled.Sub(began); d < 2*time.Second || d > 4*time.Second {
		t.Errorf("app signalled after %v; want at the 2s timeout", d)
	}
	call.Close()
	pod.waitStopper(t, stopper, 0)
	pod.proxyLogHas(t, "drain timeout", "connections=1", `msg="signalled app"`)
}

// scenarioNoFIFO: no proxy and no pipe; the stopper warns and still works,
// counting from /proc, then exits 1: the app's preStop was not released.
func scenarioNoFIFO(t *testing.T, pod *nsPod) {
	pod.startApp(t, false)
	call := pod.call(t, "[::1]:8080")
	// /proc counts with polling only: no destroy events.
	stopper := pod.startStopper(t, "--interval", "200ms", "--min-drain", "0s", "--source", "proc", "--exit-wait", "1s")
	time.Sleep(time.Second)
	pod.assertNotSignalled(t, "a call open")
	call.Close()
	pod.waitSignalled(t)
	pod.waitStopper(t, stopper, 1)
	for _, want := range []string{"could not tell the proxy to drain", "counts_from=proc events=off", "wsdrain: release the app's preStop"} {
		if !strings.Contains(pod.stopperErr.String(), want) {
			t.Errorf("the stopper's log lacks %q:\n%s", want, pod.stopperErr)
		}
	}
}

// scenarioWrapper: the app runs under a shell that would not pass SIGTERM
// on; the server process itself must get it.
func scenarioWrapper(t *testing.T, pod *nsPod) {
	pod.startApp(t, true)
	pod.startProxy(t)
	stopper := pod.startStopper(t, "--interval", "200ms", "--min-drain", "0s")
	pod.waitSignalled(t)
	pod.waitStopper(t, stopper, 0)
	pod.proxyLogHas(t, fmt.Sprintf("pid=%d", pod.appPID))
	if pod.appPID == pod.app.Process.Pid {
		t.Fatal("the app was not behind a wrapper")
	}
}

// scenarioUnreadableMaster: a pre-fork server whose master runs as another
// user (nginx: a root master, workers as nobody). The stopper, as the
// workers' user, cannot read the master's fds; it must refuse rather than
// signal only the workers, which the master would replace.
func scenarioUnreadableMaster(t *testing.T, pod *nsPod) {
	bin := copyForAnyUser(t, os.Args[0])
	pod.startApp(t, false, bin, "--worker-uid", "65534")
	stopper := exec.Command(bin, "stopper", "--target-port", "8080", "--fifo", pod.fifo, "--min-drain", "0s")
	stopper.Env = append(os.Environ(), "WSDRAIN_TEST_ROLE=wsdrain")
	stopper.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	stopper.Stderr = pod.stopperErr
	if err := stopper.Start(); err != nil {
		t.Fatal(err)
	}
	pod.waitStopper(t, stopper, 1)
	t.Logf("stopper:\n%s", pod.stopperErr)
	for _, want := range []string{"permission denied reading /proc/PID/fd", "hint: run the sidecar with the app's runAsUser"} {
		if !strings.Contains(pod.stopperErr.String(), want) {
			t.Errorf("stopper output lacks %q:\n%s", want, pod.stopperErr)
		}
	}
	if strings.Contains(pod.stopperErr.String(), "signalled app") {
		t.Errorf("the stopper signalled part of a server it could not fully see:\n%s", pod.stopperErr)
	}
	pod.assertNotSignalled(t, "a master the stopper cannot inspect")
}

// scenarioExclusions: three calls from 127.0.0.2 and an idle keep-alive
// scraper from 127.0.0.3. Counted alike by count, the proxy's /metrics and
// the stopper, which signals after the last call while the scraper stays.
func scenarioExclusions(t *testing.T, pod *nsPod) {
	pod.startApp(t, false)
	pod.startProxy(t, "--target-port", "8080", "--ignore-peer", "127.0.0.3")
	var calls []*testCall
	for range 3 {
		calls = append(calls, pod.callFrom(t, "127.0.0.2", "127.0.0.1:8080"))
	}
	keepAliveScrape(t, "127.0.0.3", "127.0.0.1:8080")
	scraped := time.Now()
	wantCount := func(want string, args ...string) {
		t.Helper()
		out, err := wsdrainCmd(append([]string{"count", "--target-port", "8080"}, args...)...).CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != want {
			t.Errorf("wsdrain count %s printed %q (%v); want %s", strings.Join(args, " "), out, err, want)
		}
	}
	for _, source := range []string{"netlink", "proc"} {
		wantCount("4", "--source", source)
		wantCount("3", "--source", source, "--ignore-peer", "127.0.0.3")
	}
	// The calls echo every 500 ms; the scraper says nothing for 3 s.
	for time.Since(scraped) < 3*time.Second {
		for _, c := range calls {
			c.echo(t)
		}
		time.Sleep(500 * time.Millisecond)
	}
	wantCount("3", "--ignore-idle", "2s")
	wantCount("4", "--ignore-idle", "10s")
	if got := metricsLine(t, "http://127.0.0.1:8081/metrics", "wsdrain_connections"); got != `wsdrain_connections{port="8080"} 3` {
		t.Errorf("/metrics: %q; want 3 calls (the scraper left out)", got)
	}

	stopper := pod.startStopper(t, "--interval", "200ms", "--min-drain", "0s", "--ignore-peer", "127.0.0.3")
	time.Sleep(time.Second)
	pod.assertNotSignalled(t, "three calls open")
	for _, c := range calls {
		c.echo(t)
		c.Close()
	}
	lastClosed := time.Now()
	pod.waitSignalledSoonAfter(t, lastClosed, 1200*time.Millisecond, "about one 200ms interval, the scraper left out")
	pod.waitStopper(t, stopper, 0)
	// The scraper was still there at the zero: excluded_peer=1.
	pod.proxyLogHas(t, `not_calls="peers in 127.0.0.3/32"`, "count=3 excluded_peer=1 excluded_idle=0",
		"count=0 excluded_peer=1 excluded_idle=0", `msg="signalled app"`)
}

// keepAliveScrape asks the app for /healthz on a connection from the local
// address from and keeps it open and idle, as a metrics scraper does.
func keepAliveScrape(t *testing.T, from, addr string) {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	fmt.Fprintf(c, "GET /healthz HTTP/1.1\r\nHost: app\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil || resp.StatusCode != 200 || resp.Close {
		t.Fatalf("keep-alive scrape: %v %v", resp, err)
	}
	resp.Body.Close()
}

// metricsLine is the sample line of metric name in a scrape of url.
func metricsLine(t *testing.T, url, name string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, name+"{") || strings.HasPrefix(line, name+" ") {
			return line
		}
	}
	return ""
}

// nsPod is what a pod holds: an app, the proxy, a stopper, an emptyDir.
type nsPod struct {
	dir, fifo            string
	app                  *exec.Cmd
	appPID               int
	appLines             chan string
	proxyOut, stopperErr *syncBuffer

	// The way into a private sidecar (startPrivateSidecar).
	hookArgs, hookExit pipeEnds
	hookErrCopied      chan struct{}
}

func newNSPod(t *testing.T) *nsPod {
	dir := t.TempDir()
	return &nsPod{dir: dir, fifo: filepath.Join(dir, "drain.fifo"), appLines: make(chan string, 16),
		proxyOut: &syncBuffer{}, stopperErr: &syncBuffer{}}
}

// startApp runs the demo app on port 8080, under a shell if wrapped; bin
// and args, if given, replace the test binary and add app flags.
func (p *nsPod) startApp(t *testing.T, wrapped bool, binArgs ...string) {
	t.Helper()
	bin := os.Args[0]
	if len(binArgs) > 0 {
		bin = binArgs[0]
	}
	args := append([]string{"--port", "8080"}, binArgs[min(1, len(binArgs)):]...)
	p.app = exec.Command(bin, args...)
	if wrapped {
		p.app = exec.Command("/bin/sh", "-c", `"$0" --port 8080; echo wrapper: app exited`, bin)
	}
	p.app.Env = append(os.Environ(), "WSDRAIN_TEST_ROLE=app")
	stdout, _ := p.app.StdoutPipe()
	if err := p.app.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.app.Process.Kill(); p.app.Wait() })
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			p.appLines <- sc.Text()
		}
		close(p.appLines)
	}()
	line := <-p.appLines
	if _, err := fmt.Sscanf(line, "listening pid=%d", &p.appPID); err != nil {
		t.Fatalf("app did not start: %q", line)
	}
}

func (p *nsPod) startProxy(t *testing.T, extra ...string) {
	t.Helper()
	cmd := wsdrainCmd(append([]string{"proxy", "--listen", ":8081", "--health-url", "http://127.0.0.1:8080/healthz", "--fifo", p.fifo}, extra...)...)
	cmd.Stdout, cmd.Stderr = p.proxyOut, p.proxyOut
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() })
	waitProxyReady(t)
}

// startStopper runs the stopper in a mount namespace of its own, as in the
// sidecar's container, while PID 1 (this test, standing for /pause) is in
// another: a shared PID namespace.
func (p *nsPod) startStopper(t *testing.T, args ...string) *exec.Cmd {
	t.Helper()
	cmd := wsdrainCmd(append([]string{"stopper", "--target-port", "8080", "--fifo", p.fifo}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNS}
	cmd.Stderr = p.stopperErr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return cmd
}

func (p *nsPod) waitStopper(t *testing.T, cmd *exec.Cmd, wantCode int) {
	t.Helper()
	err := cmd.Wait()
	if code := cmd.ProcessState.ExitCode(); code != wantCode {
		t.Fatalf("stopper exited %d (%v), want %d:\n%s", code, err, wantCode, p.stopperErr)
	}
}

// assertNotSignalled checks the app has had no signal so far.
func (p *nsPod) assertNotSignalled(t *testing.T, while string) {
	t.Helper()
	select {
	case line := <-p.appLines:
		t.Fatalf("app said %q with %s", line, while)
	default:
	}
}

// waitSignalled returns when the app reports a signal.
func (p *nsPod) waitSignalled(t *testing.T) time.Time {
	t.Helper()
	select {
	case line := <-p.appLines:
		if line != "app: got terminated" {
			t.Fatalf("app said %q, want a SIGTERM", line)
		}
		return time.Now()
	case <-time.After(15 * time.Second):
		t.Fatalf("app not signalled within 15s\nstopper:\n%s\nproxy:\n%s", p.stopperErr, p.proxyOut)
	}
	return time.Time{}
}

// waitSignalledSoonAfter waits for the app's signal and checks that it came
// within limit of the last call's close.
func (p *nsPod) waitSignalledSoonAfter(t *testing.T, lastClosed time.Time, limit time.Duration, want string) {
	t.Helper()
	d := p.waitSignalled(t).Sub(lastClosed)
	t.Logf("app signalled %v after the last call closed", d.Round(time.Microsecond))
	if d > limit {
		t.Errorf("app signalled %v after the last call closed; want %s", d, want)
	}
}

// proxyLogHas waits a little for each line: the proxy copies the stopper's
// lines from the pipe after the stopper has written them, maybe after it exited.
func (p *nsPod) proxyLogHas(t *testing.T, wants ...string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for _, w := range wants {
		for !strings.Contains(p.proxyOut.String(), w) && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if !strings.Contains(p.proxyOut.String(), w) {
			t.Errorf("proxy log (kubectl logs) lacks %q:\n%s", w, p.proxyOut)
		}
	}
}

// copyForAnyUser copies a binary where an unprivileged user may run it:
// the go test build directory is private to root.
func copyForAnyUser(t *testing.T, path string) string {
	t.Helper()
	dir := t.TempDir()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "wsdrain")
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	for d := dir; d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
		os.Chmod(d, 0o755)
	}
	return bin
}

// testCall is a call: a connection upgraded by the app that echoes lines.
type testCall struct {
	net.Conn
	r *bufio.Reader
}

func (p *nsPod) call(t *testing.T, addr string) *testCall {
	t.Helper()
	return p.callFrom(t, "", addr)
}

// callFrom is a call from the local address from, or any when "".
func (p *nsPod) callFrom(t *testing.T, from, addr string) *testCall {
	t.Helper()
	d := net.Dialer{}
	if from != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
	}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	fmt.Fprintf(c, "GET /call HTTP/1.1\r\nHost: app\r\n\r\n")
	call := &testCall{c, bufio.NewReader(c)}
	if line, err := call.r.ReadString('\n'); err != nil || line != "connected\n" {
		t.Fatalf("call to %s: %q %v", addr, line, err)
	}
	call.echo(t)
	return call
}

func (c *testCall) echo(t *testing.T) {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "hello\n")
	if line, err := c.r.ReadString('\n'); err != nil || line != "hello\n" {
		t.Fatalf("call did not echo: %q %v", line, err)
	}
}

// enterPodLikeNamespace finishes what CLONE_NEWNET|NEWPID|NEWNS began: a
// /proc of this PID namespace (else /proc/PID lists the host's) and lo up.
func enterPodLikeNamespace(t *testing.T) {
	if os.Getpid() != 1 {
		t.Fatalf("not PID 1 of a new PID namespace (pid %d)", os.Getpid())
	}
	if err := mountProc(); err != nil {
		t.Fatal(err)
	}
	if err := setLoopbackUp(); err != nil {
		t.Fatalf("lo up: %v", err)
	}
}

func setLoopbackUp() error {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer syscall.Close(fd)
	var ifr struct {
		name  [syscall.IFNAMSIZ]byte
		flags uint16
		_     [22]byte
	}
	copy(ifr.name[:], "lo")
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, uintptr(fd), syscall.SIOCGIFFLAGS, uintptr(unsafe.Pointer(&ifr))); e != 0 {
		return e
	}
	ifr.flags |= syscall.IFF_UP
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, uintptr(fd), syscall.SIOCSIFFLAGS, uintptr(unsafe.Pointer(&ifr))); e != 0 {
		return e
	}
	return nil
}

func init() { testRoles["app"] = runTestApp }

// runTestApp is the demo app: a dual-stack server whose /healthz answers
// 200 and whose /call becomes a line echo, like a WebSocket call. It says
// on stdout when it listens and which signal ended it.
func runTestApp(args []string) int {
	fs := flag.NewFlagSet("app", flag.ExitOnError)
	port := fs.Int("port", 8080, "")
	workerUID := fs.Int("worker-uid", -1, "also run a worker as this user, holding the listening socket (a pre-fork server)")
	worker := fs.Bool("worker", false, "be that worker: hold fd 3 until a signal")
	fs.Parse(args)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	if *worker {
		fmt.Printf("worker: got %v\n", <-sigs)
		return 0
	}
	ln, err := net.Listen("tcp", ":"+strconv.Itoa(*port))
	if err == nil && *workerUID >= 0 {
		err = startTestWorker(ln.(*net.TCPListener), uint32(*workerUID))
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {})
	mux.HandleFunc("/call", serveEchoCall)
	go http.Serve(ln, mux)
	fmt.Printf("listening pid=%d\n", os.Getpid())
	fmt.Printf("app: got %v\n", <-sigs)
	return 0
}

// startTestWorker runs a worker of the demo app as uid, sharing ln.
func startTestWorker(ln *net.TCPListener, uid uint32) error {
	f, err := ln.File()
	if err != nil {
		return err
	}
	defer f.Close()
	cmd := exec.Command(os.Args[0], "--worker")
	cmd.Stdout, cmd.Stderr, cmd.ExtraFiles = os.Stdout, os.Stderr, []*os.File{f}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}, Pdeathsig: syscall.SIGKILL}
	return cmd.Start()
}

func serveEchoCall(w http.ResponseWriter, r *http.Request) {
	conn, rw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return
	}
	defer conn.Close()
	rw.WriteString("connected\n")
	rw.Flush()
	for {
		line, err := rw.ReadString('\n')
		if err != nil {
			return
		}
		rw.WriteString(line)
		rw.Flush()
	}
}

func testLogger(w io.Writer) *slog.Logger { return slog.New(slog.NewTextHandler(w, nil)) }
