//go:build linux

package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The scenarios of TestEndToEndInNamespaces that concern the PID namespace:
// "private-" ones give the sidecar a PID namespace of its own, the proxy as
// its PID 1, as in a pod without shareProcessNamespace; the app is outside.

// scenarioOtherUID: a shared PID namespace, but the sidecar under another
// UID than the app's, so it cannot tell who owns the socket. That is the
// shared case with the owner missing, not a private PID namespace: the
// error and its hint stay, and the hook fails.
func scenarioOtherUID(t *testing.T, pod *nsPod) {
	pod.startApp(t, false)
	pod.startProxy(t)
	cmd := exec.Command(copyForAnyUser(t, os.Args[0]), "stopper", "--target-port", "8080", "--fifo", pod.fifo,
		"--interval", "200ms", "--min-drain", "0s")
	cmd.Env = append(os.Environ(), "WSDRAIN_TEST_ROLE=wsdrain")
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNS, Credential: &syscall.Credential{Uid: 65532, Gid: 65532}}
	cmd.Stderr = pod.stopperErr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pod.waitStopper(t, cmd, 1)
	for _, want := range []string{"pid_namespace=shared", "cannot see which process listens on port 8080", "hint: run the sidecar with the app's runAsUser"} {
		if !strings.Contains(pod.stopperErr.String(), want) {
			t.Errorf("stopper output lacks %q:\n%s", want, pod.stopperErr)
		}
	}
	pod.assertNotSignalled(t, "a stopper that could not see the app")
}

// scenarioPrivateCalls: in a PID namespace of its own the stopper drains as
// before, releases the app's preStop within about one interval of the last
// call and not before, signals nothing, and sees the app's exit (here the
// test plays the kubelet and sends it) as its listening socket closing.
func scenarioPrivateCalls(t *testing.T, pod *nsPod) {
	pod.startApp(t, false)
	pod.startPrivateSidecar(t)
	ipv4, ipv6 := pod.call(t, "127.0.0.1:8080"), pod.call(t, "[::1]:8080")
	preStop := getDrain("http://127.0.0.1:8081")
	hook := pod.execStopper(t, "--interval", "200ms", "--min-drain", "0s")
	waitFor(t, "readiness 503", func() bool { return status(t, "GET", "http://127.0.0.1:8081/") == 503 })

	time.Sleep(time.Second)
	assertWaiting(t, preStop, "two calls open")
	ipv4.echo(t)
	ipv4.Close()
	time.Sleep(time.Second)
	assertWaiting(t, preStop, "one call open")
	ipv6.echo(t)
	ipv6.Close()
	lastClosed := time.Now()

	select {
	case r := <-preStop:
		t.Logf("the app's preStop released %v after the last call closed", time.Since(lastClosed).Round(time.Millisecond))
		if d := time.Since(lastClosed); d > 1200*time.Millisecond {
			t.Errorf("the app's preStop released %v after the last call; want about one 200ms interval", d)
		}
		if !strings.HasPrefix(r, "200 ") {
			t.Errorf("the app's preStop got %q, want 200", r)
		}
	case <-time.After(15 * time.Second):
		t.Fatalf("the app's preStop not released within 15s\nstopper:\n%s\nproxy:\n%s", pod.stopperErr, pod.proxyOut)
	}
	time.Sleep(time.Second)
	pod.assertNotSignalled(t, "its preStop released")
	hook.assertRunning(t, "the app still listening")
	killed := time.Now()
	pod.app.Process.Signal(syscall.SIGTERM) // the kubelet's part
	pod.waitSignalled(t)
	hook.wait(t, 0)
	t.Logf("stopper returned %v after the app's SIGTERM", time.Since(killed).Round(time.Millisecond))
	pod.proxyLogHas(t, "pid_namespace=private", "count=2", "count=1", "count=0",
		"the kubelet delivers the stop signal", `msg="app exited" source=stopper within=`)
	if strings.Contains(pod.proxyOut.String(), "signalled app") {
		t.Errorf("the stopper signalled something:\n%s", pod.proxyOut)
	}
	if code := status(t, "GET", "http://127.0.0.1:8081/"); code != 503 {
		t.Errorf("the proxy, PID 1 beside the stopper, answered %d after the stopper; want 503 from a proxy still draining", code)
	}
}

// scenarioPrivateTimeout: a call outlives -timeout; the app's preStop is
// released at the timeout, the stopper waits -exit-wait for an exit that
// does not come and returns 0, and the app, never signalled, still serves.
func scenarioPrivateTimeout(t *testing.T, pod *nsPod) {
	pod.startApp(t, false)
	pod.startPrivateSidecar(t)
	call := pod.call(t, "127.0.0.1:8080")
	preStop := getDrain("http://127.0.0.1:8081")
	began := time.Now()
	hook := pod.execStopper(t, "--interval", "200ms", "--min-drain", "0s", "--timeout", "2s", "--exit-wait", "1s")
	select {
	case <-preStop:
		if d := time.Since(began); d < 2*time.Second || d > 4*time.Second {
			t.Errorf("the app's preStop released after %v; want at the 2s timeout", d)
		}
	case <-time.After(15 * time.Second):
		t.Fatalf("the app's preStop not released within 15s\nstopper:\n%s", pod.stopperErr)
	}
	hook.wait(t, 0)
	call.echo(t)
	pod.assertNotSignalled(t, "the stopper done")
	pod.proxyLogHas(t, "drain timeout", "connections=1", "the kubelet delivers the stop signal",
		"app still listening; the kubelet takes over")
}

// assertWaiting checks the app's preStop has not returned.
func assertWaiting(t *testing.T, preStop <-chan string, while string) {
	t.Helper()
	select {
	case r := <-preStop:
		t.Fatalf("the app's preStop returned %q with %s", r, while)
	default:
	}
}

// waitProxyReady waits until the proxy passes the app's health on.
func waitProxyReady(t *testing.T) {
	t.Helper()
	waitFor(t, "the proxy to pass the app's health on", func() bool {
		resp, err := http.Get("http://127.0.0.1:8081/")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
}

// startPrivateSidecar starts the sidecar container of a pod without
// shareProcessNamespace: a PID and mount namespace of its own, with the
// proxy as its PID 1 and the app out of sight; the network is the pod's.
func (p *nsPod) startPrivateSidecar(t *testing.T) {
	t.Helper()
	p.hookArgs, p.hookExit = pipe(t), pipe(t)
	hookErr := pipe(t)
	cmd := exec.Command(os.Args[0], "proxy", "--listen", ":8081", "--health-url", "http://127.0.0.1:8080/healthz", "--fifo", p.fifo)
	cmd.Env = append(os.Environ(), "WSDRAIN_TEST_ROLE=sidecar")
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID | syscall.CLONE_NEWNS}
	cmd.ExtraFiles = []*os.File{p.hookArgs.r, hookErr.w, p.hookExit.w}
	cmd.Stdout, cmd.Stderr = p.proxyOut, p.proxyOut
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.hookArgs.w.Close(); cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() })
	p.hookArgs.r.Close()
	hookErr.w.Close()
	p.hookExit.w.Close()
	p.hookErrCopied = make(chan struct{})
	go func() { io.Copy(p.stopperErr, hookErr.r); close(p.hookErrCopied) }()
	waitProxyReady(t)
}

// execStopper runs the stopper inside the private sidecar, as the kubelet
// runs an exec hook: in the container's PID and mount namespaces.
func (p *nsPod) execStopper(t *testing.T, args ...string) *sidecarHook {
	t.Helper()
	args = append([]string{"stopper", "--target-port", "8080", "--fifo", p.fifo}, args...)
	if _, err := io.WriteString(p.hookArgs.w, strings.Join(args, "\x00")); err != nil {
		t.Fatal(err)
	}
	p.hookArgs.w.Close()
	h := &sidecarHook{pod: p, exit: make(chan int, 1)}
	go func() {
		code := -1
		fmt.Fscan(p.hookExit.r, &code)
		<-p.hookErrCopied
		h.exit <- code
	}()
	return h
}

// sidecarHook is a stopper running inside the private sidecar.
type sidecarHook struct {
	pod  *nsPod
	exit chan int
}

func (h *sidecarHook) wait(t *testing.T, wantCode int) {
	t.Helper()
	select {
	case code := <-h.exit:
		if code != wantCode {
			t.Fatalf("stopper exited %d, want %d:\n%s", code, wantCode, h.pod.stopperErr)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("stopper still running after 20s:\n%s", h.pod.stopperErr)
	}
}

func (h *sidecarHook) assertRunning(t *testing.T, while string) {
	t.Helper()
	select {
	case code := <-h.exit:
		t.Fatalf("stopper exited %d with %s:\n%s", code, while, h.pod.stopperErr)
	default:
	}
}

type pipeEnds struct{ r, w *os.File }

func pipe(t *testing.T) pipeEnds {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close(); w.Close() })
	return pipeEnds{r, w}
}

// runTestSidecar plays the container runtime for a sidecar with a PID
// namespace of its own (it is that namespace's PID 1): it mounts the
// namespace's /proc, leaves a hook runner inside, the way in for an exec
// hook, then becomes the proxy, which so is PID 1 as in the pod.
func runTestSidecar(proxyArgs []string) int {
	if err := mountProc(); err != nil {
		fmt.Fprintln(os.Stderr, "sidecar:", err)
		return 1
	}
	hook := exec.Command(os.Args[0])
	hook.Env = append(os.Environ(), "WSDRAIN_TEST_ROLE=hook")
	hook.ExtraFiles = []*os.File{os.NewFile(3, "hook-args"), os.NewFile(4, "hook-stderr"), os.NewFile(5, "hook-exit")}
	hook.Stdout, hook.Stderr = os.Stderr, os.Stderr
	if err := hook.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "sidecar:", err)
		return 1
	}
	for fd := 3; fd <= 5; fd++ {
		syscall.CloseOnExec(fd) // the hook's pipes are not the proxy's
	}
	// Unlike exec.Cmd, Exec keeps a duplicate variable's first value.
	env := slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, "WSDRAIN_TEST_ROLE=") })
	err := syscall.Exec(os.Args[0], append([]string{os.Args[0]}, proxyArgs...), append(env, "WSDRAIN_TEST_ROLE=wsdrain"))
	fmt.Fprintln(os.Stderr, "sidecar: exec proxy:", err)
	return 1
}

// runTestHook waits inside the sidecar for the stopper's arguments, runs
// it, and reports its exit status; no arguments (the test ended) runs none.
func runTestHook([]string) int {
	args, err := io.ReadAll(os.NewFile(3, "hook-args"))
	if err != nil || len(args) == 0 {
		return 1
	}
	cmd := wsdrainCmd(strings.Split(string(args), "\x00")...)
	cmd.Stderr = os.NewFile(4, "hook-stderr")
	cmd.Run()
	fmt.Fprintln(os.NewFile(5, "hook-exit"), cmd.ProcessState.ExitCode())
	return 0
}

// mountProc mounts the caller's PID namespace's /proc, in its own mount
// namespace only.
func mountProc() error {
	if err := syscall.Mount("", "/", "", syscall.MS_REC|syscall.MS_PRIVATE, ""); err != nil {
		return err
	}
	return syscall.Mount("proc", "/proc", "proc", syscall.MS_NOSUID|syscall.MS_NODEV|syscall.MS_NOEXEC, "")
}

func init() {
	testRoles["sidecar"] = runTestSidecar
	testRoles["hook"] = runTestHook
}
