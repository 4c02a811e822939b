// pidns.go tells whether the stopper shares the app's PID namespace, and,
// when it does not, waits for the app's exit by its listening socket, the
// one trace of the app that the shared network namespace still shows.

package main

import (
	"context"
	"os"
	"path/filepath"
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
	if err := s.notify("done"); err != nil {
		s.log.Warn("could not release the app's preStop", "err", err)
	}
	s.log.Info("not signalling the app: the PID namespace is not shared, so the kubelet delivers the stop signal when the app's preStop returns")
	s.listenerGone(ctx, s.cfg.exitWait)
	return nil
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
