//go:build linux

package main

import (
	"context"
	"fmt"
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

// TestStopperGoesOnWhileAnotherRunHoldsTheRecord: whoever holds the
// record's lock (a stuck stopper run, another process) must not hold up
// the app's preStop: the wait ends after its bound, or when the stopper is
// told to stop, and "done" is still sent.
func TestStopperGoesOnWhileAnotherRunHoldsTheRecord(t *testing.T) {
	tests := []struct {
		name        string
		lockWait    time.Duration
		cancelAfter time.Duration
	}{
		{"the wait is bounded", 300 * time.Millisecond, 0},
		{"a SIGTERM ends the wait", time.Hour, 300 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, port := startTestApp(t)
			path := filepath.Join(t.TempDir(), "wsdrain.signalled")
			holdLock(t, path)
			var log syncBuffer
			var events []string
			fs := procFS{"/proc"}
			s := &stopper{
				cfg:    stopperConfig{interval: 100 * time.Millisecond, exitWait: time.Second},
				log:    testLogger(&log),
				count:  func() (tally, error) { return tally{}, nil },
				notify: func(msg string) error { events = append(events, msg); return nil },
				now:    time.Now,
				sleep:  sleepCtx,
				signal: (&appSignaller{fs: fs, record: signalLog{path: path}, lockWait: tt.lockWait, sig: syscall.SIGTERM, log: testLogger(&log),
					source: newProcSource(), port: port, protect: fs.ancestors(os.Getpid())}).signal,
				alive: fs.alive,
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if tt.cancelAfter > 0 {
				time.AfterFunc(tt.cancelAfter, cancel)
			}
			ended := make(chan error, 1)
			go func() { ended <- s.run(ctx) }()
			select {
			case <-ended:
			case <-time.After(30 * time.Second):
				t.Fatalf("the stopper still waits for the record's lock after 30s:\n%s", log.String())
			}
			if !slices.Contains(events, "done") {
				t.Errorf("the app's preStop was not released (events %q):\n%s", events, log.String())
			}
			if !strings.Contains(log.String(), "going on without the record's lock") {
				t.Errorf("the stopper did not say why it went on:\n%s", log.String())
			}
		})
	}
}

// TestRecordLockDoesNotOutlastTheTimeout: the lock is waited for after the
// drain, which may itself have taken --timeout (30 s below the grace
// period), or with --timeout 0 for ever: whoever holds it must not push the
// app's SIGTERM and "done" past the kubelet's SIGKILL.
func TestRecordLockDoesNotOutlastTheTimeout(t *testing.T) {
	_, port := startTestApp(t)
	dir := t.TempDir()
	holdLock(t, filepath.Join(dir, "wsdrain.signalled"))
	for _, timeout := range []string{"0s", "20s"} {
		t.Run("timeout="+timeout, func(t *testing.T) {
			cmd := wsdrainCmd("stopper", "--target-port", strconv.Itoa(int(port)), "--fifo", filepath.Join(dir, "drain.fifo"),
				"--min-drain", "0s", "--timeout", timeout, "--exit-wait", "0s")
			var out syncBuffer
			cmd.Stdout, cmd.Stderr = &out, &out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			exited := make(chan error, 1)
			go func() { exited <- cmd.Wait() }()
			select {
			case <-exited:
			case <-time.After(15 * time.Second):
				cmd.Process.Kill()
				<-exited
				t.Fatalf("the stopper still waited for the record's lock after 15s (--timeout %s):\n%s", timeout, out.String())
			}
			if !strings.Contains(out.String(), "going on without the record's lock") {
				t.Errorf("the stopper did not say why it went on:\n%s", out.String())
			}
		})
	}
}

// holdLock takes the lock on the record at path until the test ends.
func holdLock(t *testing.T, path string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
}

// TestStopperTrustsOnlyItsOwnRecord runs the real stopper with a record
// file that it must not believe or write through.
func TestStopperTrustsOnlyItsOwnRecord(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipped: giving the record another owner needs root (run as root, as CI does)")
	}
	tests := []struct {
		name  string
		setUp func(t *testing.T, record string, app process, port uint16) // app: the zero process when none runs
		code  int
		say   string
	}{
		{"an unrelated entry does not hide a wrong port", func(t *testing.T, record string, _ process, _ uint16) {
			writeFile(t, record, "4194000 1\n", 0o600)
		}, 1, "nothing listens on port"},
		{"an entry of another port does not hide a wrong port", func(t *testing.T, record string, _ process, _ uint16) {
			writeFile(t, record, fmt.Sprintf("%d 1 port 1\n", os.Getpid()), 0o600)
		}, 1, "nothing listens on port"},
		{"a link is not followed", func(t *testing.T, record string, _ process, _ uint16) {
			writeFile(t, record+".elsewhere", "keep me\n", 0o600)
			if err := os.Symlink(record+".elsewhere", record); err != nil {
				t.Fatal(err)
			}
		}, 0, "signalled app"},
		{"another user's file is not believed", func(t *testing.T, record string, app process, port uint16) {
			// A line the stopper would believe in its own file.
			writeFile(t, record, fmt.Sprintf("%d %d port %d\n", app.pid, app.start, port), 0o600)
			if err := os.Chown(record, 65534, 65534); err != nil {
				t.Fatal(err)
			}
		}, 0, "signalled app"},
		{"a file others may write is not believed", func(t *testing.T, record string, app process, port uint16) {
			writeFile(t, record, fmt.Sprintf("%d %d port %d\n", app.pid, app.start, port), 0o666)
		}, 0, "signalled app"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			record := filepath.Join(dir, "wsdrain.signalled")
			port, app := uint16(mustPort(t, freeAddr(t))), process{}
			if tt.code == 0 {
				var cmd *exec.Cmd
				cmd, port = startTestApp(t)
				app, _ = procFS{"/proc"}.stat(cmd.Process.Pid)
			}
			tt.setUp(t, record, app, port)
			proxyPipe(t, filepath.Join(dir, "drain.fifo"), false)
			before := snapshot(t, dir)
			out, err := wsdrainCmd("stopper", "--target-port", strconv.Itoa(int(port)), "--fifo", filepath.Join(dir, "drain.fifo"), "--min-drain", "0s").CombinedOutput()
			if code := exitCodeOf(err); code != tt.code || !strings.Contains(string(out), tt.say) {
				t.Fatalf("stopper exited %d, want %d saying %q:\n%s", code, tt.code, tt.say, out)
			}
			if tt.code == 0 && !slices.Equal(before, snapshot(t, dir)) {
				t.Errorf("the stopper wrote through a record it must not trust: before %q, after %q", before, snapshot(t, dir))
			}
		})
	}
}

// TestTargetProcessRecordsWhatWasSignalledBeforeAFailure: with two targets,
// the first signalled and the second refused, a repeated hook must know the
// first was signalled. The stopper runs as nobody, so a root process refuses.
func writeFile(t *testing.T, path, content string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil { // past the umask
		t.Fatal(err)
	}
}

// snapshot lists the regular files in dir with their contents.
func snapshot(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var files []string
	for _, e := range entries {
		if e.Type().IsRegular() {
			b, _ := os.ReadFile(filepath.Join(dir, e.Name()))
			files = append(files, e.Name()+": "+string(b))
		}
	}
	return files
}

func exitCodeOf(err error) int {
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

// TestARepeatedRunAfterTheListenerClosed: an app signalled by an earlier
// run may close its listener before it exits. A repeated run then finds
// nothing on the port: it succeeds while the recorded process is exiting
// or gone, and waits for it; without such a record the error stands.
func TestARepeatedRunAfterTheListenerClosed(t *testing.T) {
	app, _ := startTestApp(t)
	fs := procFS{"/proc"}
	p, err := fs.stat(app.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	port := uint16(mustPort(t, freeAddr(t))) // nothing listens there
	path := filepath.Join(t.TempDir(), "wsdrain.signalled")
	writeFile(t, path, fmt.Sprintf("%d %d port %d\n", p.pid, p.start, port), 0o600)
	var log syncBuffer
	a := &appSignaller{fs: fs, record: signalLog{path: path}, sig: syscall.SIGTERM, log: testLogger(&log),
		source: newProcSource(), port: port, protect: fs.ancestors(os.Getpid())}
	if got, err := a.signal(context.Background()); err != nil || len(got) != 1 || got[0].pid != p.pid {
		t.Fatalf("with the recorded app still running: %+v, %v; want it returned, to be waited for", got, err)
	}
	app.Process.Kill()
	app.Wait()
	if got, err := a.signal(context.Background()); err != nil || len(got) != 0 {
		t.Fatalf("with the recorded app gone: %+v, %v; want success and nothing to wait for", got, err)
	}
	writeFile(t, path, fmt.Sprintf("%d %d port %d\n", p.pid, p.start, port+1), 0o600)
	if _, err := a.signal(context.Background()); err == nil || !strings.Contains(err.Error(), "nothing listens") {
		t.Fatalf("with a record of another port: %v; want the error", err)
	}
	if strings.Contains(log.String(), "signalled app") {
		t.Errorf("a run signalled though nothing listened:\n%s", log.String())
	}
}

// TestAReleaseNeverStandsForASignal: a release on record, which names no
// process, must not make a run skip a live app it never signalled.
func TestAReleaseNeverStandsForASignal(t *testing.T) {
	app, port := startTestApp(t)
	fs := procFS{"/proc"}
	path := filepath.Join(t.TempDir(), "wsdrain.signalled")
	writeFile(t, path, fmt.Sprintf("0 0 port %d\n", port), 0o600)
	var log syncBuffer
	a := &appSignaller{fs: fs, record: signalLog{path: path}, sig: syscall.SIGTERM, log: testLogger(&log),
		source: newProcSource(), port: port, protect: fs.ancestors(os.Getpid())}
	_, err := a.signal(context.Background())
	if err != nil || !strings.Contains(log.String(), fmt.Sprintf(`msg="signalled app" pid=%d`, app.Process.Pid)) {
		t.Fatalf("with a release on record: %v; want the app signalled:\n%s", err, log.String())
	}
}
