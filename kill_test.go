//go:build linux

package main

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestStatReadsAwkwardNames(t *testing.T) {
	root := t.TempDir()
	writeStat(t, root, 77, "77 (my (odd) app) S 12 77 77 0 -1 4194560 0 0 0 0 1 2 0 0 20 0 3 0 123456 0 0\n")
	p, err := procFS{root}.stat(77)
	if err != nil {
		t.Fatal(err)
	}
	if p.comm != "my (odd) app" || p.ppid != 12 || p.start != 123456 || p.state != 'S' {
		t.Fatalf("stat = %+v", p)
	}
	writeStat(t, root, 78, "78 (cut")
	if _, err := (procFS{root}).stat(78); err == nil {
		t.Fatal("a malformed stat parsed")
	}
}

func TestTargetSelectionRules(t *testing.T) {
	// A pre-fork server: master 10 (child of a wrapper shell 5) and workers
	// 11, 12 all hold the listening socket; PID 1 is the pod's pause process.
	owners := []process{{pid: 1}, {pid: 10, ppid: 5}, {pid: 11, ppid: 10}, {pid: 12, ppid: 10}, {pid: 30, ppid: 1}}
	got := rootsOf(withoutUnsafe(slices.Clone(owners), map[int]bool{30: true}))
	if len(got) != 1 || got[0].pid != 10 {
		t.Fatalf("targets %+v; want only the master, pid 10", got)
	}
}

func TestFindsTheListenerOwner(t *testing.T) {
	ln, err := net.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	fs := procFS{"/proc"}
	f := &appSignaller{fs: fs, source: newProcSource(), port: port}
	got, err := f.find()
	if err != nil || len(got) != 1 || got[0].pid != os.Getpid() {
		t.Fatalf("find = %+v, %v; want this test process %d", got, err, os.Getpid())
	}
	f.protect = fs.ancestors(os.Getpid())
	if got, err := f.find(); err == nil {
		t.Fatalf("find returned the stopper's own process %+v", got)
	}
	f.port = port + 1
	if _, err := f.find(); err == nil || !strings.Contains(err.Error(), "nothing listens") {
		t.Fatalf("find on an unused port: %v", err)
	}
}

func TestSignalsOnceAcrossRepeatedHooks(t *testing.T) {
	app, port := startTestApp(t)
	fs := procFS{"/proc"}
	var log syncBuffer
	a := &appSignaller{
		fs:      fs,
		source:  newProcSource(),
		port:    port,
		protect: fs.ancestors(os.Getpid()),
		record:  signalLog{path: filepath.Join(t.TempDir(), "wsdrain.signalled")},
		sig:     syscall.SIGTERM,
		log:     testLogger(&log),
	}
	first, err := a.signal(context.Background())
	if err != nil || len(first) != 1 || first[0].pid != app.Process.Pid {
		t.Fatalf("first run signalled %+v, %v; want the app, pid %d", first, err, app.Process.Pid)
	}
	// The second run comes while the app is still exiting, or after.
	if _, err := a.signal(context.Background()); err != nil {
		t.Fatalf("second run failed: %v", err)
	}
	if n := strings.Count(log.String(), `msg="signalled app"`); n != 1 {
		t.Errorf("signalled %d times over two runs, want once:\n%s", n, log.String())
	}
	app.Wait()
	if _, err := a.signal(context.Background()); err != nil {
		t.Fatalf("a run after the app exited failed: %v", err)
	}
	a.record.path = filepath.Join(t.TempDir(), "never-signalled")
	if _, err := a.signal(context.Background()); err == nil {
		t.Fatal("with no app and no earlier run, the stopper must fail")
	}
}

func TestOverlappingHooksSignalOnce(t *testing.T) {
	app, port := startTestApp(t)
	fs := procFS{"/proc"}
	var log syncBuffer
	record := signalLog{path: filepath.Join(t.TempDir(), "wsdrain.signalled")}
	errs := make(chan error, 4)
	for range 4 {
		go func() {
			a := &appSignaller{fs: fs, record: record, sig: syscall.SIGTERM, log: testLogger(&log),
				source: newProcSource(), port: port, protect: fs.ancestors(os.Getpid())}
			_, err := a.signal(context.Background())
			errs <- err
		}()
	}
	for range 4 {
		if err := <-errs; err != nil {
			t.Errorf("a run failed: %v", err)
		}
	}
	app.Wait()
	if n := strings.Count(log.String(), `msg="signalled app"`); n != 1 {
		t.Errorf("four overlapping runs signalled %d times, want once:\n%s", n, log.String())
	}
}

// startTestApp runs the demo app on a free port and waits until it listens.
// The port is free when chosen, not when the app binds it: another process
// on the machine may take it in between, so a failed start is tried again.
func startTestApp(t *testing.T, extra ...string) (*exec.Cmd, uint16) {
	t.Helper()
	for try := 1; ; try++ {
		port := uint16(mustPort(t, freeAddr(t)))
		cmd := exec.Command(os.Args[0], append([]string{"--port", strconv.Itoa(int(port))}, extra...)...)
		lines, err := startTestAppCmd(t, cmd)
		if err != nil && try < 3 {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			for lines.Scan() {
			}
		}()
		return cmd, port
	}
}

// runTestAppCmd starts cmd as the demo app, kills it when the test ends, and
// returns its output after the line that says it listens.
func runTestAppCmd(t *testing.T, cmd *exec.Cmd) *bufio.Scanner {
	t.Helper()
	lines, err := startTestAppCmd(t, cmd)
	if err != nil {
		t.Fatal(err)
	}
	return lines
}

func startTestAppCmd(t *testing.T, cmd *exec.Cmd) (*bufio.Scanner, error) {
	t.Helper()
	cmd.Env = append(os.Environ(), "WSDRAIN_TEST_ROLE=app")
	var stderr syncBuffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	lines := bufio.NewScanner(stdout)
	if !lines.Scan() || !strings.Contains(lines.Text(), "listening") {
		return nil, fmt.Errorf("app did not start: %q %v; stderr: %s", lines.Text(), lines.Err(), stderr.String())
	}
	return lines, nil
}

func mustPort(t *testing.T, addr string) int {
	t.Helper()
	_, p, _ := net.SplitHostPort(addr)
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func writeStat(t *testing.T, root string, pid int, content string) {
	t.Helper()
	dir := filepath.Join(root, strconv.Itoa(pid))
	os.MkdirAll(dir, 0o755)
	if err := os.WriteFile(filepath.Join(dir, "stat"), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestSignalsOnlyTheProcessWithTheRecordedStartTime: a process whose start
// time is not the one the stopper saw (its PID was reused) is left alone,
// through the real signalling path.
func TestSignalsOnlyTheProcessWithTheRecordedStartTime(t *testing.T) {
	cmd := exec.Command(os.Args[0], "--port", "0")
	lines := runTestAppCmd(t, cmd)
	fs := procFS{"/proc"}
	app, err := fs.stat(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	// The app reports the first signal it gets. SIGINT goes to the stale
	// identity; were both pending, the lower-numbered SIGINT would come first.
	stale := app
	stale.start++
	if err := fs.signalProcess(stale, syscall.SIGINT); err != nil {
		t.Fatalf("signalling a stale identity: %v", err)
	}
	if err := fs.signalProcess(app, syscall.SIGTERM); err != nil {
		t.Fatalf("signalling the app: %v", err)
	}
	if !lines.Scan() || lines.Text() != "app: got terminated" {
		t.Fatalf("app said %q; want only the SIGTERM sent to its own identity", lines.Text())
	}
	cmd.Wait()
	if err := fs.signalProcess(app, syscall.SIGTERM); err != nil {
		t.Fatalf("signalling an app that has exited: %v; want nothing done", err)
	}
}

// TestSignalNeverReachesAReusedPID reuses the app's PID for real, in a PID
// namespace of its own, between the moment the stopper takes the process
// in hand and the moment it has checked the start time: the new process
// must not get the signal. The check reads a stat that the test serves
// through a pipe, so the test knows when the check runs.
func TestSignalNeverReachesAReusedPID(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipped: reusing a PID on purpose needs a PID namespace (run as root, as CI does)")
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestPIDReuseInNamespace$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), "WSDRAIN_PID_REUSE=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID}
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS: TestPIDReuseInNamespace") {
		t.Fatalf("%v\n%s", err, out)
	}
}

// TestPIDReuseInNamespace is the inside of TestSignalNeverReachesAReusedPID.
func TestPIDReuseInNamespace(t *testing.T) {
	if os.Getenv("WSDRAIN_PID_REUSE") == "" || os.Getpid() != 1 {
		t.Skip("runs only inside the PID namespace that TestSignalNeverReachesAReusedPID creates")
	}
	old := exec.Command(os.Args[0], "--port", "0")
	oldLines := runTestAppCmd(t, old)
	go func() {
		for oldLines.Scan() {
		}
	}()
	pid := old.Process.Pid
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, strconv.Itoa(pid)), 0o755)
	statPipe := filepath.Join(root, strconv.Itoa(pid), "stat")
	if err := syscall.Mkfifo(statPipe, 0o600); err != nil {
		t.Fatal(err)
	}
	const start = 4242
	signalled := make(chan error, 1)
	go func() {
		signalled <- procFS{root}.signalProcess(process{pid: pid, comm: "app", start: start}, syscall.SIGTERM)
	}()
	w, err := os.OpenFile(statPipe, os.O_WRONLY, 0) // returns once the check reads the stat
	if err != nil {
		t.Fatal(err)
	}
	old.Process.Kill()
	old.Wait()
	if err := os.WriteFile("/proc/sys/kernel/ns_last_pid", []byte(strconv.Itoa(pid-1)), 0); err != nil {
		t.Fatal(err)
	}
	reuser := exec.Command(os.Args[0], "--port", "0")
	lines := runTestAppCmd(t, reuser)
	if reuser.Process.Pid != pid {
		t.Skipf("skipped: the new process got pid %d, not %d", reuser.Process.Pid, pid)
	}
	// The old process, by the check's reading, is still the one at pid.
	fmt.Fprintf(w, "%d (app) S 1 %d %d 0 -1 4194560 0 0 0 0 1 2 0 0 20 0 3 0 %d 0 0\n", pid, pid, pid, start)
	w.Close()
	if err := <-signalled; err != nil {
		t.Fatalf("signalProcess: %v", err)
	}
	said := make(chan string, 1)
	go func() {
		lines.Scan()
		said <- lines.Text()
	}()
	select {
	case s := <-said:
		t.Fatalf("the process that reused pid %d got the stopper's signal (it said %q)", pid, s)
	case <-time.After(time.Second):
	}
}

// TestOwnPIDNamespace: only PID 1 in the stopper's own mount namespace means
// a private PID namespace; anything unreadable means shared.
func TestOwnPIDNamespace(t *testing.T) {
	tests := []struct {
		name       string
		self, init string // ns/mnt link targets; "" leaves the link out
		want       bool
	}{
		{"PID 1 is in this container", "mnt:[4026532301]", "mnt:[4026532301]", true},
		{"PID 1 is the pod's pause", "mnt:[4026532301]", "mnt:[4026532287]", false},
		{"PID 1 unreadable", "mnt:[4026532301]", "", false},
		{"no /proc/self", "", "mnt:[4026532301]", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			for dir, target := range map[string]string{"self": tt.self, "1": tt.init} {
				if target == "" {
					continue
				}
				if err := os.MkdirAll(filepath.Join(root, dir, "ns"), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.Symlink(target, filepath.Join(root, dir, "ns", "mnt")); err != nil {
					t.Fatal(err)
				}
			}
			if got := (procFS{root: root}).ownPIDNamespace(); got != tt.want {
				t.Errorf("ownPIDNamespace() = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestParseSignal(t *testing.T) {
	for s, want := range map[string]syscall.Signal{"TERM": syscall.SIGTERM, "sigusr1": syscall.SIGUSR1, "SIGHUP": syscall.SIGHUP, "Int": syscall.SIGINT} {
		if sig, err := parseSignal(s); err != nil || sig != want || signalNames[sig] == "" {
			t.Errorf("parseSignal(%q) = %v, %v; want %v", s, sig, err, want)
		}
	}
	for _, s := range []string{"KILL", "SIGKILL", "STOP", "SIGSIGTERM", ""} {
		if _, err := parseSignal(s); err == nil {
			t.Errorf("parseSignal(%q) accepted", s)
		}
	}
}
