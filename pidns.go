// pidns.go tells whether the stopper shares the app's PID namespace, and,
// when it does not, waits for the app's exit by its listening socket, the
// one trace of the app that the shared network namespace still shows.

package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

// ownPIDNamespace reports whether PID 1 is in this process's own mount
// namespace, that is, in its own container: then the PID namespace is the
// container's, the app is out of sight, and the kubelet alone signals it.
// With shareProcessNamespace, PID 1 is the pause container's /pause, whose
// mount namespace is another, and whose link may be unreadable. Only a
// positive match counts: an error means "shared", so that a doubt leaves
// the stopper signalling the app, and a missing app an error, as before.
func (fs procFS) ownPIDNamespace() bool {
	self, err := os.Readlink(filepath.Join(fs.root, "self", "ns", "mnt"))
	if err != nil {
		return false
	}
	init, err := os.Readlink(filepath.Join(fs.root, "1", "ns", "mnt"))
	return err == nil && init == self
}

// pidNamespaceName is the stopper's mode, for its log.
func pidNamespaceName(own bool) string {
	if own {
		return "private"
	}
	return "shared"
}

// leaveSignalToKubelet ends the drain where the app is out of sight: "done"
// releases the app's preStop, and the kubelet then sends the app its stop
// signal itself. The stopper signals nothing; it waits for the app's exit
// only so that the proxy, stopped after this hook returns, outlives the app.
func (s *stopper) leaveSignalToKubelet(ctx context.Context) error {
	// Before the release, as the shared shape looks for the port's owner:
	// with nothing listening, the counts were of a port the app does not
	// serve (a wrong --target-port, say), and a zero of them proves nothing.
	listening, lerr := s.listening()
	if err := s.release(ctx); err != nil {
		return err
	}
	if lerr == nil && !listening {
		// A repeated hook (the kubelet restarted mid-termination, say) finds
		// the app gone after the run that released it; that is no error.
		if s.releasedEarlier(ctx) {
			s.log.Info("app already gone after an earlier stopper run released its preStop")
			return nil
		}
		err := hintError{fmt.Errorf("nothing listens on port %d", s.cfg.port),
			"set --target-port to the port the app takes its calls on: the drain counted the connections of this one"}
		s.log.Error("could not see the app", "err", err)
		return err
	}
	s.recordRelease(ctx)
	s.log.Info("not signalling the app: the PID namespace is not shared, so the kubelet delivers the stop signal when the app's preStop returns")
	s.listenerGone(ctx, s.cfg.exitWait)
	return nil
}

// releaseTarget is how the record names a release made while the app
// listened: a line "0 0 released port N" names no process, so the shared
// shape's runs, whose target is "port N", never take it for one.
func (s *stopper) releaseTarget() string { return "released port " + strconv.Itoa(int(s.cfg.port)) }

// recordRelease notes that this run released the app's preStop while the
// app listened, so that a repeated run that finds it gone is no error.
func (s *stopper) recordRelease(ctx context.Context) {
	if s.record.path == "" {
		return
	}
	rec := s.record.open(ctx, recordLockWait, s.log)
	defer rec.close()
	if err := rec.add([]process{{}}, s.releaseTarget()); err != nil {
		s.log.Warn("could not record the release; a repeated hook will report an error", "err", err)
	}
}

// releasedEarlier reports whether an earlier run recorded a release.
func (s *stopper) releasedEarlier(ctx context.Context) bool {
	if s.record.path == "" {
		return false
	}
	rec := s.record.open(ctx, recordLockWait, s.log)
	defer rec.close()
	return len(rec.signalledAs(s.releaseTarget())) > 0
}

// listenerGone waits until nothing listens on the app's port, up to limit,
// and says how it went. A lookup that fails is not "gone": it waits on.
func (s *stopper) listenerGone(ctx context.Context, limit time.Duration) {
	const step = 100 * time.Millisecond
	released := s.now()
	for {
		listening, err := s.listening()
		waited := s.now().Sub(released)
		if err == nil && !listening {
			s.log.Info("app exited", "within", waited.Round(time.Millisecond), "seen_as", "its listening socket closed")
			return
		}
		if waited >= limit || s.sleep(ctx, min(step, limit-waited)) != nil {
			if err != nil {
				s.log.Warn("could not see whether the app still listens", "err", err)
			}
			s.log.Warn("app still listening; the kubelet takes over", "waited", waited.Round(time.Millisecond))
			return
		}
	}
}
