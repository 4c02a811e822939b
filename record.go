// record.go keeps the files beside the drain pipe: what earlier stopper runs
// did, as a hook may be delivered twice or overlap another, and the drain's
// state, which a proxy restarted while the pod terminates resumes.

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
)

// recordLockWait bounds the wait for the record's lock, which runs hold briefly.
const recordLockWait = 5 * time.Second

// signalLog is the record: a line "PID START port N" per process signalled;
// "0 0 port N" is a release made with the app out of sight, naming no process.
type signalLog struct{ path string }

// record is the file as one run opened it.
type record struct {
	f     *os.File
	lines []string
}

// open opens the record and takes its lock, waiting for at most lockWait
// (0: until ctx ends). A run goes on without a record it cannot use or lock.
func (l signalLog) open(ctx context.Context, lockWait time.Duration, log *slog.Logger) record {
	if l.path == "" {
		return record{}
	}
	f, err := openOwn(l.path, os.O_RDWR|os.O_APPEND|os.O_CREATE, 0)
	if err != nil {
		log.Warn("not using the record of signalled processes; a repeated hook may signal the app again", "err", err)
		return record{}
	}
	if err := lockWithin(ctx, f, lockWait); err != nil {
		log.Warn("going on without the record's lock; an overlapping stopper run may signal the app too", "err", err)
	}
	b, _ := io.ReadAll(io.LimitReader(f, 64<<10)) // a few lines
	return record{f: f, lines: strings.Split(string(b), "\n")}
}

// openOwn opens path through no symlink, if of type want (0: regular) and
// ours alone: another user's file could drain the pod or forge the record.
func openOwn(path string, flag int, want os.FileMode) (*os.File, error) {
	f, err := os.OpenFile(path, flag|syscall.O_NOFOLLOW, 0o600)
	if errors.Is(err, syscall.ELOOP) {
		return nil, fmt.Errorf("%s is a symbolic link", path)
	}
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err == nil {
		st, ok := fi.Sys().(*syscall.Stat_t)
		switch {
		case fi.Mode().Type() != want:
			err = fmt.Errorf("not a %s (%s)", map[os.FileMode]string{0: "regular file", os.ModeNamedPipe: "named pipe"}[want], fi.Mode().Type())
		case !ok:
			err = errors.New("owner unknown")
		case int(st.Uid) != os.Geteuid():
			err = fmt.Errorf("owned by uid %d, not by this process's uid %d", st.Uid, os.Geteuid())
		case fi.Mode().Perm()&0o022 != 0:
			err = fmt.Errorf("writable by group or others (mode %04o)", fi.Mode().Perm())
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return f, nil
}

// lockWithin takes an exclusive flock on f, polling: a blocking flock would
// ignore SIGTERM.
func lockWithin(ctx context.Context, f *os.File, wait time.Duration) error {
	for deadline := time.Now().Add(wait); ; {
		switch err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); {
		case !errors.Is(err, syscall.EWOULDBLOCK):
			return err
		case wait > 0 && time.Now().After(deadline):
			return fmt.Errorf("another process held it for %v", wait)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("stopper interrupted while waiting for the lock: %w", ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// has reports whether p, by PID and start time, was signalled before.
func (r record) has(p process) bool {
	id := fmt.Sprintf("%d %d ", p.pid, p.start)
	return slices.ContainsFunc(r.lines, func(line string) bool { return strings.HasPrefix(line, id) })
}

// doneEarlier decides a run that found nothing to act on: success if an
// earlier run acted on the target (returning those still exiting), else findErr.
func (r record) doneEarlier(target string, alive func(process) bool, findErr error, log *slog.Logger) ([]process, error) {
	var earlier []process
	for _, line := range r.lines {
		var p process
		if _, err := fmt.Sscan(line, &p.pid, &p.start); err == nil && line == fmt.Sprintf("%d %d %s", p.pid, p.start, target) {
			earlier = append(earlier, p)
		}
	}
	if len(earlier) == 0 {
		return nil, findErr
	}
	exiting := slices.DeleteFunc(earlier, func(p process) bool { return p.pid == 0 || !alive(p) }) // 0: a release
	log.Info("app already signalled or released by an earlier stopper run", "still_exiting", len(exiting), "detail", findErr)
	return exiting, nil
}

// released notes a release made while the app listened; a run that found
// nothing listening (notFound) is decided as doneEarlier decides.
func (l signalLog) released(ctx context.Context, target string, notFound error, log *slog.Logger) error {
	rec := l.open(ctx, recordLockWait, log)
	defer rec.close()
	if notFound != nil {
		// The app is out of sight: none of the record's processes is waited for.
		_, err := rec.doneEarlier(target, func(process) bool { return false }, notFound, log)
		return err
	}
	rec.add([]process{{}}, target, log)
	return nil
}

// add appends the processes just acted on as target, in one write.
func (r record) add(ps []process, target string, log *slog.Logger) {
	if r.f == nil || len(ps) == 0 {
		return
	}
	var b strings.Builder
	for _, p := range ps {
		fmt.Fprintf(&b, "%d %d %s\n", p.pid, p.start, target)
	}
	if _, err := r.f.WriteString(b.String()); err != nil {
		log.Warn("could not write the record; a repeated hook may act again or fail", "err", err)
	}
}

// close releases the lock; Close is safe on a nil *os.File.
func (r record) close() { r.f.Close() }

// drainState is wsdrain.state: "terminating" once a drain met a held GET /drain,
// "done" once the stopper is done too; a drain alone is a sidecar's restart.
type drainState struct {
	f                  *os.File // nil: in memory only
	mu                 sync.Mutex
	draining, released bool
	waiters            int
	word               string
}

// resume takes on the state an earlier proxy of this pod left (KEP-4438).
func (p *proxy) resume(path string) {
	p.state = &drainState{}
	f, err := openOwn(path, os.O_RDWR|os.O_APPEND|os.O_CREATE, 0)
	if err != nil {
		p.log.Warn("drain state kept in memory only: a restarted proxy forgets a drain", "err", err)
		return
	}
	b, _ := io.ReadAll(io.LimitReader(f, 64))
	p.state.f = f
	if word := string(b); word == "terminating" || word == "done" {
		p.state.word, p.state.released = word, word == "done"
		p.drainOnce.Do(func() { close(p.draining) })
		p.log.Info("the pod is terminating (drain state of an earlier proxy): readiness answers 503")
	}
	if p.state.released {
		p.releaseOnce.Do(func() { close(p.released) })
		p.log.Info("the stopper was done with the app before this proxy started")
	}
}

// updateState applies what the proxy learnt, rewriting the file if need be.
func (p *proxy) updateState(change func()) {
	s := p.state
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
		return
	}
	s.f.Truncate(0)
	if _, err := s.f.WriteString(s.word); err != nil {
		p.log.Warn("cannot write the drain state: a restarted proxy may forget the drain", "err", err)
	}
}
