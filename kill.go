// kill.go finds the app's server in a shared PID namespace and signals it:
// never PID 1 (the pod's /pause), the stopper or its ancestors, and never
// SIGKILL, which the kubelet owns.

package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// process identifies a process across PID reuse by its start time.
type process struct {
	pid   int
	ppid  int
	comm  string
	start uint64 // clock ticks after boot, field 22 of /proc/PID/stat
	state byte
}

// procFS reads processes under a proc mount; tests point it elsewhere.
type procFS struct{ root string }

// stat reads /proc/PID/stat; comm may hold spaces and ')', so the fields
// after it are found from the last ')'.
func (fs procFS) stat(pid int) (process, error) {
	b, err := os.ReadFile(filepath.Join(fs.root, strconv.Itoa(pid), "stat"))
	if err != nil {
		return process{}, err
	}
	open, end := bytes.IndexByte(b, '('), bytes.LastIndexByte(b, ')')
	rest := strings.Fields(string(b[end+1:]))
	if open < 0 || end < open || len(rest) < 20 || len(rest[0]) != 1 {
		return process{}, fmt.Errorf("pid %d: malformed stat", pid)
	}
	ppid, err1 := strconv.Atoi(rest[1])
	start, err2 := strconv.ParseUint(rest[19], 10, 64)
	if err1 != nil || err2 != nil {
		return process{}, fmt.Errorf("pid %d: malformed stat", pid)
	}
	return process{pid: pid, ppid: ppid, comm: string(b[open+1 : end]), start: start, state: rest[0][0]}, nil
}

// ownPIDNamespace reports whether PID 1 shares this process's mount namespace
// (its container): then the app is out of sight. With shareProcessNamespace
// PID 1 is /pause, whose link may be unreadable: only a match counts.
func (fs procFS) ownPIDNamespace() bool {
	self, err := os.Readlink(filepath.Join(fs.root, "self", "ns", "mnt"))
	if err != nil {
		return false
	}
	init, err := os.Readlink(filepath.Join(fs.root, "1", "ns", "mnt"))
	return err == nil && init == self
}

// socketOwners returns the processes with an fd on one of the sockets, and
// those whose fds it may not read; a PID reused meanwhile is skipped.
func (fs procFS) socketOwners(inodes []uint64) (owners, unreadable []process, err error) {
	var links []string // what /proc/PID/fd/N reads for an fd on a socket
	for _, inode := range inodes {
		links = append(links, fmt.Sprintf("socket:[%d]", inode))
	}
	entries, err := os.ReadDir(fs.root)
	if err != nil {
		return nil, nil, err
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue // not a process
		}
		p, err := fs.stat(pid)
		if err != nil {
			continue // gone meanwhile
		}
		dir := filepath.Join(fs.root, e.Name(), "fd")
		fds, err := os.ReadDir(dir)
		held := slices.ContainsFunc(fds, func(fd os.DirEntry) bool {
			link, _ := os.Readlink(filepath.Join(dir, fd.Name()))
			return slices.Contains(links, link)
		})
		if now, serr := fs.stat(pid); serr != nil || now.start != p.start {
			continue // gone or reused while its fds were read
		}
		switch {
		case errors.Is(err, os.ErrPermission):
			unreadable = append(unreadable, p)
		case err == nil && held:
			owners = append(owners, p)
		}
	}
	return owners, unreadable, nil
}

// ancestors returns pid and every process above it.
func (fs procFS) ancestors(pid int) map[int]bool {
	seen := map[int]bool{}
	for pid > 0 && !seen[pid] {
		seen[pid] = true
		p, err := fs.stat(pid)
		if err != nil {
			break
		}
		pid = p.ppid
	}
	return seen
}

// alive reports whether p runs: not a zombie, and its PID not reused.
func (fs procFS) alive(p process) bool {
	now, err := fs.stat(p.pid)
	return err == nil && now.start == p.start && now.state != 'Z' && now.state != 'X'
}

// signalProcess sends sig to p unless it has gone, through a pidfd, which
// names one process for good: the start time read after the pidfd was taken
// proves it names p, and no reuse of the PID can slip in before the signal.
func (fs procFS) signalProcess(p process, sig syscall.Signal) error {
	what := fmt.Sprintf("signal %s to pid %d (%s)", signalNames[sig], p.pid, p.comm)
	proc, err := os.FindProcess(p.pid) // pidfd_open(2) on Linux
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	defer proc.Release()
	if !fs.alive(p) {
		return nil
	}
	// p is alive, so it was when FindProcess ran: no handle means no pidfd.
	if err := proc.WithHandle(func(uintptr) {}); err != nil {
		return hintError{fmt.Errorf("%s: no pidfd: %w", what, err),
			"wsdrain signals through a pidfd (Linux 5.4 or later, allowed by the runtime's default seccomp profile), so that a reused PID is never signalled"}
	}
	switch err := proc.Signal(sig); { // pidfd_send_signal(2)
	case err == nil || errors.Is(err, os.ErrProcessDone):
		return nil
	case errors.Is(err, syscall.EPERM):
		return hintError{fmt.Errorf("%s: operation not permitted", what),
			"run the sidecar with the app's runAsUser: signalling another user's process needs CAP_KILL, which the restricted profile forbids"}
	default:
		return fmt.Errorf("%s: %w", what, err)
	}
}

// rootsOf keeps the processes whose parent is not among them: a pre-fork
// server's master, which shuts its workers down cleanly.
func rootsOf(ps []process) []process {
	var roots []process
	for _, p := range ps {
		if !slices.ContainsFunc(ps, func(q process) bool { return q.pid == p.ppid }) {
			roots = append(roots, p)
		}
	}
	return roots
}

// withoutUnsafe drops PID 1 and the protected processes, whatever they hold.
func withoutUnsafe(ps []process, protected map[int]bool) []process {
	return slices.DeleteFunc(ps, func(p process) bool { return p.pid == 1 || protected[p.pid] })
}

// appSignaller finds the app's server and signals it once, remembering whom
// across hook runs.
type appSignaller struct {
	fs       procFS
	source   socketSource
	port     uint16
	protect  map[int]bool // the stopper and its ancestors
	record   signalLog
	lockWait time.Duration // recordLockWait; 0: until ctx ends
	sig      syscall.Signal
	log      *slog.Logger
}

// find returns the roots of the holders of the LISTEN socket on the port: the
// server itself, past wrappers (npm, "sh -c") that would not pass a signal on.
func (a *appSignaller) find() ([]process, error) {
	inodes, err := a.source.listeners(a.port)
	if err != nil {
		return nil, fmt.Errorf("finding the listener on port %d: %w", a.port, err)
	}
	if len(inodes) == 0 {
		return nil, fmt.Errorf("nothing listens on port %d", a.port)
	}
	owners, unreadable, err := a.fs.socketOwners(inodes)
	if err != nil {
		return nil, err
	}
	// One we may not inspect may hold it too (a master running as another
	// user): signalling only the workers we see would leave it listening.
	if unreadable = withoutUnsafe(unreadable, a.protect); len(unreadable) > 0 {
		u := fmt.Sprintf("pid %d (%s)", unreadable[0].pid, unreadable[0].comm)
		if len(unreadable) > 1 {
			u += fmt.Sprintf(" and %d more", len(unreadable)-1)
		}
		return nil, hintError{fmt.Errorf("cannot see which process listens on port %d: permission denied reading /proc/PID/fd of %s", a.port, u),
			"run the sidecar with the app's runAsUser, so it may inspect and signal the app"}
	}
	if owners = rootsOf(withoutUnsafe(owners, a.protect)); len(owners) > 0 {
		return owners, nil
	}
	return nil, fmt.Errorf("no process in this PID namespace holds the socket listening on port %d", a.port)
}

// signal signals every target that no earlier run signalled, records them
// (even when a later signal fails), and returns whom to wait for.
func (a *appSignaller) signal(ctx context.Context) ([]process, error) {
	rec := a.record.open(ctx, a.lockWait, a.log)
	defer rec.close()
	target := "port " + strconv.Itoa(int(a.port))
	targets, err := a.find()
	if err != nil {
		return rec.doneEarlier(target, a.fs.alive, err, a.log)
	}
	var fresh []process
	for _, p := range targets {
		if rec.has(p) {
			a.log.Info("app already signalled by an earlier stopper run", "pid", p.pid, "process", p.comm)
			continue
		}
		if err = a.fs.signalProcess(p, a.sig); err != nil {
			break
		}
		a.log.Info("signalled app", "pid", p.pid, "process", p.comm, "signal", signalNames[a.sig])
		fresh = append(fresh, p)
	}
	rec.add(fresh, target, a.log)
	if err != nil {
		return nil, err
	}
	return targets, nil
}

// parseSignal accepts TERM, SIGTERM or sigterm; never KILL (the kubelet's) or
// STOP (a stopped app holds its calls).
func parseSignal(s string) (syscall.Signal, error) {
	for sig, name := range signalNames {
		if strings.EqualFold(s, name) || strings.EqualFold("SIG"+s, name) {
			return sig, nil
		}
	}
	return 0, usageError{fmt.Errorf("stopper: invalid value %q for flag --signal: want one of TERM, INT, QUIT, HUP, USR1, USR2", s)}
}

var signalNames = map[syscall.Signal]string{
	syscall.SIGTERM: "SIGTERM", syscall.SIGINT: "SIGINT", syscall.SIGQUIT: "SIGQUIT",
	syscall.SIGHUP: "SIGHUP", syscall.SIGUSR1: "SIGUSR1", syscall.SIGUSR2: "SIGUSR2",
}
