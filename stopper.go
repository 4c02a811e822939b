// stopper.go is the sidecar's preStop hook: it starts the drain, waits until
// no call is left on the app's port, then signals the app or, where the app
// is out of sight, leaves that to the kubelet. Its log goes to the proxy's.

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"time"
)

func runStopper(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, err := parseStopperFlags(args, stdout)
	pipe := newFIFOWriter(cfg.fifo)
	defer pipe.close()
	toProxy := slog.NewTextHandler(pipe, nil).WithAttrs([]slog.Attr{slog.String("source", "stopper")})
	if err != nil {
		// The kubelet throws a hook's output away: only the proxy's log is read.
		if !errors.Is(err, flag.ErrHelp) {
			slog.New(toProxy).Error("stopper not started: the pod is not drained", "err", err)
		}
		return err
	}
	log := slog.New(slog.NewMultiHandler(slog.NewTextHandler(stderr, nil), toProxy))
	fs := procFS{root: "/proc"}
	source, err := openSource(cfg.calls, func(msg string, err error) { log.Warn(msg, "err", err) })
	if err != nil {
		log.Error("cannot count connections", "err", err)
		return err
	}
	events, unsubscribe := subscribeIfNetlink(source.name(), cfg.port, log)
	defer unsubscribe()
	record := signalLog{path: filepath.Join(filepath.Dir(cfg.fifo), "wsdrain.signalled")}
	s := &stopper{
		cfg:    cfg,
		log:    log,
		source: source.name(),
		events: events,
		cpu:    processCPU,
		count:  func() (tally, error) { return source.established(cfg.port, cfg.exclude) },
		notify: pipe.send,
		now:    time.Now,
		sleep:  sleepCtx,
		signal: (&appSignaller{
			fs: fs, source: source, port: cfg.port, protect: fs.ancestors(os.Getpid()),
			record:   record,
			lockWait: recordLockWait,
			sig:      cfg.signal,
			log:      log,
		}).signal,
		alive:           fs.alive,
		ownPIDNamespace: fs.ownPIDNamespace(),
		record:          record,
		listening: func() (bool, error) {
			inodes, err := source.listeners(cfg.port)
			return len(inodes) > 0, err
		},
	}
	return s.run(ctx)
}

// subscribeIfNetlink returns a wait that a destroy event on the port cuts
// short, or nil (poll only) with /proc or where events are refused.
func subscribeIfNetlink(source string, port uint16, log *slog.Logger) (wait func(context.Context, time.Duration) (bool, error), stop func()) {
	if source != "netlink" {
		return nil, func() {}
	}
	wake, stop, err := watchDestroys(port, func(err error) {
		log.Warn("socket destroy events stopped; polling every --interval only", "err", err)
	})
	if err != nil {
		log.Warn("socket destroy events unavailable; polling every --interval only", "err", err)
		return nil, func() {}
	}
	return func(ctx context.Context, d time.Duration) (bool, error) { return sleepOrWake(ctx, d, wake) }, stop
}

// sleepOrWake sleeps for d, or until wake gets a value or ctx ends.
func sleepOrWake(ctx context.Context, d time.Duration, wake <-chan struct{}) (woken bool, err error) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return false, nil
	case <-wake:
		return true, nil
	case <-ctx.Done():
		return false, ctx.Err()
	}
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	_, err := sleepOrWake(ctx, d, nil)
	return err
}

// stopper is the drain loop; its boundaries are fields so tests can drive it.
type stopper struct {
	cfg    stopperConfig
	log    *slog.Logger
	source string // where counts come from, for the log
	// events waits as sleep does, but a destroy event ends it; nil: poll only.
	events func(ctx context.Context, d time.Duration) (woken bool, err error)
	cpu    func() time.Duration // read only with events
	count  func() (tally, error)
	notify func(msg string) error
	now    func() time.Time
	sleep  func(ctx context.Context, d time.Duration) error
	signal func(ctx context.Context) ([]process, error) // returns whom to wait for
	alive  func(process) bool
	// In a PID namespace of its own, the app's listening socket is the one
	// sign of it, and the record notes the release for a repeated run.
	ownPIDNamespace bool
	listening       func() (bool, error)
	record          signalLog
	readyAt         time.Time // counts that answer events wait for it (charge)
	drained         bool      // the proxy has taken "drain"
}

func (s *stopper) run(ctx context.Context) error {
	begun := s.now()
	s.log.Info("stopper started", "version", buildVersion(), "target_port", s.cfg.port,
		"min_drain", s.cfg.minDrain, "timeout", s.cfg.timeout, "counts_from", s.source, "events", map[bool]string{true: "on", false: "off"}[s.events != nil],
		"not_calls", s.cfg.exclude.String(), "pid_namespace", map[bool]string{true: "private", false: "shared"}[s.ownPIDNamespace])
	if err := s.tellDrain(); err != nil {
		s.log.Warn("could not tell the proxy to drain; retrying at each count", "err", err)
	}
	if err := s.waitForCalls(ctx, begun); err != nil {
		return err
	}
	if s.ownPIDNamespace {
		return s.leaveSignalToKubelet(ctx)
	}
	signalled, err := s.signal(ctx)
	// Release the app's preStop even when signalling failed: the kubelet's
	// own SIGTERM then reaches the app, and the calls are over either way.
	rerr := s.release(ctx)
	if err != nil {
		s.log.Error("could not signal the app", "err", err)
		return err
	}
	if len(signalled) > 0 {
		s.waitExit(ctx, "app still running after the signal", func() (bool, error) { return !slices.ContainsFunc(signalled, s.alive), nil })
	}
	return rerr
}

// tellDrain sends "drain" until the proxy has taken it, once per count: a
// full pipe or a late proxy must not hold up the counting.
func (s *stopper) tellDrain() error {
	if s.drained {
		return nil
	}
	err := s.notify("drain")
	s.drained = err == nil
	return err
}

// release sends "done" (and "drain" first, if it has not got through),
// retrying for up to --exit-wait: --timeout may be unset, and a pod whose
// proxy is gone must not be held until the kubelet's SIGKILL.
func (s *stopper) release(ctx context.Context) error {
	from := s.now()
	for wait := 10 * time.Millisecond; ; wait = min(2*wait, s.cfg.interval) {
		err := s.tellDrain()
		if err == nil {
			err = s.notify("done")
		}
		if err == nil {
			return nil
		}
		left := s.cfg.exitWait - s.now().Sub(from)
		if left <= 0 || s.sleep(ctx, min(wait, left)) != nil {
			err = fmt.Errorf("release the app's preStop (tried for %v): %w", s.now().Sub(from).Round(time.Millisecond), err)
			s.log.Error("could not release the app's preStop", "err", err)
			return err
		}
	}
}

// leaveSignalToKubelet ends the drain where the app is out of sight: "done"
// releases its preStop and the kubelet signals it. The stopper waits for the
// app's exit so that the proxy, stopped after this hook, outlives the app.
func (s *stopper) leaveSignalToKubelet(ctx context.Context) error {
	// With nothing listening, the counts were of a port the app does not
	// serve (a wrong --target-port, say), and their zero proves nothing.
	listening, lerr := s.listening()
	if err := s.release(ctx); err != nil {
		return err
	}
	var notFound error
	if lerr == nil && !listening {
		notFound = hintError{fmt.Errorf("nothing listens on port %d", s.cfg.port),
			"set --target-port to the port the app takes its calls on: the drain counted the connections of this one"}
	}
	// A repeated hook finds the app gone after the run that released it.
	switch err := s.record.released(ctx, "port "+strconv.Itoa(int(s.cfg.port)), notFound, s.log); {
	case err != nil:
		s.log.Error("could not see the app", "err", err)
		return err
	case notFound != nil:
		return nil
	}
	s.log.Info("not signalling the app: the PID namespace is not shared, so the kubelet delivers the stop signal when the app's preStop returns")
	listenerClosed := func() (bool, error) { listening, err := s.listening(); return !listening, err }
	s.waitExit(ctx, "app still listening", listenerClosed, "seen_as", "its listening socket closed")
	return nil
}

// waitExit checks every 100 ms, for up to --exit-wait, whether the app is
// gone, and says how it went; a check that fails is not gone.
func (s *stopper) waitExit(ctx context.Context, still string, gone func() (bool, error), attrs ...any) {
	const step = 100 * time.Millisecond
	from := s.now()
	for {
		ok, err := gone()
		waited := s.now().Sub(from)
		if err == nil && ok {
			s.log.Info("app exited", append([]any{"within", waited.Round(time.Millisecond)}, attrs...)...)
			return
		}
		if waited >= s.cfg.exitWait || s.sleep(ctx, min(step, s.cfg.exitWait-waited)) != nil {
			if err != nil {
				s.log.Warn("could not see whether the app has exited", "err", err)
			}
			s.log.Warn(still+"; the kubelet takes over", "waited", waited.Round(time.Millisecond))
			return
		}
	}
}

// waitForCalls returns once no call is left and --min-drain has passed, or
// at --timeout. A count it could not read is never zero, and a zero is read
// twice: neither /proc nor a netlink dump is a snapshot, and one reading can
// miss a socket.
func (s *stopper) waitForCalls(ctx context.Context, begun time.Time) error {
	r := countReporter{log: s.log}
	afterEvent := false // whether this count answers a destroy event
	for {
		var before time.Duration
		if afterEvent {
			before = s.cpu() // CPU, not the clock: a busy node makes counts slow, not dear
		}
		t, err := s.count()
		if afterEvent {
			s.charge(s.cpu() - before)
		}
		elapsed := s.now().Sub(begun)
		if err == nil && t.calls == 0 && elapsed >= s.cfg.minDrain {
			if t, err = s.count(); err != nil || t.calls != 0 {
				s.log.Warn("a zero count was not confirmed by a second reading; waiting",
					"connections", countAttr(t.calls, err), "elapsed", elapsed.Round(time.Millisecond))
			}
		}
		n := t.calls
		r.report(t, err, elapsed)
		if err == nil && n == 0 && elapsed >= s.cfg.minDrain {
			s.log.Info("no connections left", "elapsed", elapsed.Round(time.Millisecond))
			return nil
		}
		if s.cfg.timeout > 0 && elapsed >= s.cfg.timeout {
			s.log.Warn("drain timeout: stopping the app with connections still open",
				"connections", countAttr(n, err), "elapsed", elapsed.Round(time.Millisecond))
			return nil
		}
		woken, perr := s.pause(ctx, s.nextWait(n, err, elapsed))
		if perr != nil {
			return fmt.Errorf("stopper interrupted while %s connections were open: %w", countAttr(n, err), perr)
		}
		afterEvent = woken
		s.tellDrain()
	}
}

// processCPU is the CPU time, user and system, this process has used.
func processCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// A count that answered an event is paid back by waiting recountGap times
// its CPU cost, so counts that answer events use at most a twentieth of a
// core; a quiet spell builds up to recountBurst of credit, so that the last
// calls, ending milliseconds apart, are each answered at once.
const (
	recountGap   = 20
	recountBurst = time.Second
)

// charge pays for a count that answered an event: events may trigger counts
// again once readyAt has passed.
func (s *stopper) charge(cost time.Duration) {
	if floor := s.now().Add(-recountBurst); s.readyAt.Before(floor) {
		s.readyAt = floor
	}
	s.readyAt = s.readyAt.Add(recountGap * cost)
}

// pause waits for d, the next poll, or a destroy event on the port, which
// is answered once readyAt has passed (never later than the poll).
func (s *stopper) pause(ctx context.Context, d time.Duration) (woken bool, err error) {
	if s.events == nil {
		return false, s.sleep(ctx, d)
	}
	from := s.now()
	if woken, err = s.events(ctx, d); err != nil || !woken {
		return woken, err
	}
	if rest := min(s.readyAt.Sub(s.now()), d-s.now().Sub(from)); rest > 0 {
		return true, s.sleep(ctx, rest)
	}
	return true, nil
}

// nextWait is one interval, cut short to land on --min-drain or --timeout.
func (s *stopper) nextWait(n int, err error, elapsed time.Duration) time.Duration {
	wait := s.cfg.interval
	if err == nil && n == 0 && s.cfg.minDrain > elapsed {
		wait = min(wait, s.cfg.minDrain-elapsed)
	}
	if s.cfg.timeout > elapsed {
		wait = min(wait, s.cfg.timeout-elapsed)
	}
	return wait
}

// countReporter logs every change of the count, and a reminder each minute.
type countReporter struct {
	log        *slog.Logger
	last       string // the tally and error last logged
	lastLogged time.Duration
}

func (r *countReporter) report(t tally, err error, elapsed time.Duration) {
	at, now := elapsed.Round(time.Millisecond), fmt.Sprint(t, err)
	switch {
	case now != r.last && err != nil:
		r.log.Warn("connection count unknown; waiting, not signalling", "err", err, "elapsed", at)
	case now != r.last:
		r.log.Info("connections open", "count", t.calls, "excluded_peer", t.excludedPeer,
			"excluded_idle", t.excludedIdle, "elapsed", at)
	case elapsed-r.lastLogged >= time.Minute:
		r.log.Info("still draining", "connections", countAttr(t.calls, err), "elapsed", at)
	default:
		return
	}
	r.last, r.lastLogged = now, elapsed
}

func countAttr(n int, err error) string {
	if err != nil {
		return "unknown"
	}
	return fmt.Sprint(n)
}
