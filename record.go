// record.go keeps the files beside the drain pipe: what earlier stopper runs
// did (the processes signalled, a release), since hooks are delivered at least
// once and a run may repeat or overlap another; and the drain's state, so that
// a proxy restarted while the pod terminates keeps the drain. Each is trusted
// only if it is ours, never through a link; the record's lock is waited for a
// bounded time.

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// recordLockWait bounds the wait for the record's lock: a run holds it only
// to signal and write a line, and "done", which waits for it, comes late.
const recordLockWait = 5 * time.Second

type signalLog struct{ path string }

// record is the file as one run opened it; without a usable file it is empty
// and keeps nothing.
type record struct {
	f       *os.File
	entries []recordEntry
}

// recordEntry is a line "PID START TARGET" ("port 8080"). A release made with
// the app out of sight is "0 0 TARGET": no process in /proc has PID 0, so a
// release never stands for a signal.
type recordEntry struct {
	pid    int
	start  uint64
	target string
}

// open opens the record and takes its lock, waiting for at most lockWait
// (0: until ctx ends). A run goes on without a record it cannot use or lock.
func (l signalLog) open(ctx context.Context, lockWait time.Duration, log *slog.Logger) record {
	if l.path == "" {
		return record{}
	}
	f, err := openOwnFile(l.path)
	if err != nil {
		log.Warn("not using the record of signalled processes; a repeated hook may signal the app again", "err", err)
		return record{}
	}
	if err := lockWithin(ctx, f, lockWait); err != nil {
		log.Warn("going on without the record's lock; an overlapping stopper run may signal the app too", "err", err)
	}
	return record{f: f, entries: readEntries(f)}
}

// openOwnFile opens path to read and append, creating it if missing, through
// no symlink, and only if checkOwn accepts it.
func openOwnFile(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_APPEND|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if errors.Is(err, syscall.ELOOP) {
		return nil, fmt.Errorf("%s is a symbolic link", path)
	}
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err == nil {
		err = checkOwn(fi, 0)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return f, nil
}

// checkOwn refuses a file not of type want (0: regular) that another user
// owns or may write: it could drain the pod or make up what runs did.
func checkOwn(fi os.FileInfo, want os.FileMode) error {
	st, ok := fi.Sys().(*syscall.Stat_t)
	switch {
	case fi.Mode().Type() != want:
		kind := map[os.FileMode]string{0: "regular file", os.ModeNamedPipe: "named pipe"}[want]
		return fmt.Errorf("not a %s (%s)", kind, fi.Mode().Type())
	case !ok:
		return errors.New("owner unknown")
	case int(st.Uid) != os.Geteuid():
		return fmt.Errorf("owned by uid %d, not by this process's uid %d", st.Uid, os.Geteuid())
	case fi.Mode().Perm()&0o022 != 0:
		return fmt.Errorf("writable by group or others (mode %04o)", fi.Mode().Perm())
	}
	return nil
}

// lockWithin takes an exclusive flock on f, polling: a blocking flock would
// ignore SIGTERM.
func lockWithin(ctx context.Context, f *os.File, wait time.Duration) error {
	const poll = 50 * time.Millisecond
	deadline := time.Now().Add(wait)
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			return err
		}
		if wait > 0 && time.Now().After(deadline) {
			return fmt.Errorf("another process held it for %v", wait)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("stopper interrupted while waiting for the lock: %w", ctx.Err())
		case <-time.After(poll):
		}
	}
}

// readEntries reads the record's lines (a few), skipping damaged ones.
func readEntries(f *os.File) []recordEntry {
	b, _ := io.ReadAll(io.LimitReader(f, 64<<10))
	var entries []recordEntry
	for _, line := range strings.Split(string(b), "\n") {
		fields := strings.SplitN(line, " ", 3)
		if len(fields) < 3 {
			continue
		}
		pid, err1 := strconv.Atoi(fields[0])
		start, err2 := strconv.ParseUint(fields[1], 10, 64)
		if err1 == nil && err2 == nil {
			entries = append(entries, recordEntry{pid, start, fields[2]})
		}
	}
	return entries
}

// has reports whether p, by PID and start time, was signalled before.
func (r record) has(p process) bool {
	return slices.ContainsFunc(r.entries, func(e recordEntry) bool { return e.pid == p.pid && e.start == p.start })
}

// doneEarlier decides a run that found nothing to act on: success only if an
// earlier run acted on this target (it returns those still exiting), else
// findErr stands, so that a wrong port never passes for a finished job.
func (r record) doneEarlier(target string, alive func(process) bool, findErr error, log *slog.Logger) ([]process, error) {
	var earlier []process
	for _, e := range r.entries {
		if e.target == target {
			earlier = append(earlier, process{pid: e.pid, start: e.start})
		}
	}
	if len(earlier) == 0 {
		return nil, findErr
	}
	exiting := slices.DeleteFunc(earlier, func(p process) bool { return p.pid == 0 || !alive(p) }) // 0: a release
	if len(exiting) == 0 {
		log.Info("app already gone after an earlier stopper run", "detail", findErr)
		return nil, nil
	}
	log.Info("app already signalled by an earlier stopper run, and exiting", "pid", exiting[0].pid, "detail", findErr)
	return exiting, nil
}

// released notes a release made while the app listened; a run that found
// nothing listening (notFound) is decided as doneEarlier decides.
func (l signalLog) released(ctx context.Context, target string, notFound error, log *slog.Logger) error {
	rec := l.open(ctx, recordLockWait, log)
	defer rec.close()
	if notFound != nil {
		_, err := rec.doneEarlier(target, nil, notFound, log)
		return err
	}
	if err := rec.add([]process{{}}, target); err != nil {
		log.Warn("could not record the release; a repeated hook will report an error", "err", err)
	}
	return nil
}

// add appends the processes just signalled as target, in one write.
func (r record) add(ps []process, target string) error {
	if r.f == nil || len(ps) == 0 {
		return nil
	}
	var b strings.Builder
	for _, p := range ps {
		fmt.Fprintf(&b, "%d %d %s\n", p.pid, p.start, target)
	}
	_, err := r.f.WriteString(b.String())
	return err
}

// close releases the lock.
func (r record) close() {
	if r.f != nil {
		r.f.Close()
	}
}

// drainState is wsdrain.state beside the pipe: "terminating" once a drain met
// a held GET /drain, "done" once the stopper is done too. A drain alone is a
// sidecar-only restart, which the next proxy forgets.
type drainState struct {
	f                  *os.File // nil: in memory only
	mu                 sync.Mutex
	draining, released bool
	waiters            int
	word               string
}

// openDrainState takes on the word an earlier proxy of this pod left at path.
func openDrainState(path string) (*drainState, error) {
	f, err := openOwnFile(path)
	if err != nil {
		return &drainState{}, err
	}
	b, _ := io.ReadAll(io.LimitReader(f, 64))
	s := &drainState{f: f, released: string(b) == "done"}
	if s.released || string(b) == "terminating" {
		s.word = string(b)
	}
	return s, nil
}

// update applies what the proxy learnt and rewrites the word when it changes.
func (s *drainState) update(change func()) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	change()
	old := s.word
	if s.word == "" && s.draining && s.waiters > 0 {
		s.word = "terminating"
	}
	if s.word == "terminating" && s.released {
		s.word = "done"
	}
	if s.f == nil || s.word == old {
		return nil
	}
	s.f.Truncate(0)
	_, err := s.f.WriteString(s.word)
	return err
}
