// stopper.go is the sidecar's preStop hook: it starts the drain, waits until
// the app's port has no ESTABLISHED connection left, signals the app (or,
// where it cannot see the app, leaves that to the kubelet), and tells all of
// it to the proxy's log, since the kubelet discards hook output.
// It also holds the count mode, which shows an operator the same count.

package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

const stopperHelp = `usage: wsdrain stopper [flags]

The sidecar's preStop hook. Tells the proxy to drain (readiness 503), counts
the ESTABLISHED connections whose local port is -target-port, and once there
are none (and -min-drain has passed) signals the app and releases the app's
preStop. Everything it does is copied to the proxy's log (kubectl logs).

In a pod without shareProcessNamespace, where the sidecar's PID 1 is its own
proxy and the app is out of sight, it tells so by itself and signals nothing:
it releases the app's preStop, the kubelet sends the app its stop signal, and
it waits for the app's listening socket to close. -target-process and -signal
then have no effect.

example:
  wsdrain stopper --target-port 8080 --fifo /run/wsdrain/drain.fifo --timeout 570s

flags:
  -target-port N          the app's port: connections on it are the calls (default 8080)
  -fifo PATH              the proxy's drain pipe (default /run/wsdrain/drain.fifo)
  -interval D             how often to count at the latest; with netlink, a
                          call's end makes the kernel wake the stopper at once
                          and this is the safety net (default 1s)
  -min-drain D            never signal sooner than this after the drain began:
                          new calls can still arrive while the endpoint is being
                          removed from Services and load balancers (default 5s)
  -timeout D              signal anyway after this long, so the app gets SIGTERM
                          and not the kubelet's SIGKILL; keep it 30s or so below
                          terminationGracePeriodSeconds; 0 waits for ever and
                          leaves the end to the kubelet (default 0)
  -target-process NAME    signal the processes with this /proc/PID/comm instead of
                          the owner of the socket listening on -target-port
  -signal SIG             TERM, INT, QUIT, HUP, USR1 or USR2 (default TERM)
  -exit-wait D            after signalling (or releasing the app's preStop), how
                          long to wait for the app to exit, and before that how
                          long to retry the release through the pipe (default 10s)
  -source S               where counts come from: netlink (sock_diag, the kernel
                          filters), proc (/proc/net/tcp and tcp6), or auto:
                          netlink unless refused, then proc (default auto)
  -ignore-peer CIDR       connections from this network are not calls: a metrics
                          scraper, a mesh proxy's pool; repeatable; an IPv4
                          network also matches IPv4-mapped IPv6 remotes
  -ignore-idle D          connections with no data either way for D are not calls;
                          D at least 1s and above the app's own ping period; needs
                          netlink (default 0: off)

exit status: 0 when the app was signalled (or a previous run already did),
or, in a PID namespace of the sidecar's own, once the app's preStop is
released; 1 when no target was found or it could not be signalled, or the
app's preStop could not be released through the pipe; 2 for bad usage.
`

type stopperConfig struct {
	port          uint16
	fifo          string
	interval      time.Duration
	minDrain      time.Duration
	timeout       time.Duration
	exitWait      time.Duration
	targetProcess string
	signal        syscall.Signal
	source        sourceFlag
	exclude       exclusions
}

func parseStopperFlags(args []string, stdout io.Writer) (stopperConfig, error) {
	fs := flag.NewFlagSet("stopper", flag.ContinueOnError)
	port := portFlag(8080)
	interval := durationFlag{d: time.Second}
	minDrain := durationFlag{d: 5 * time.Second, allowZero: true}
	timeout := durationFlag{allowZero: true}
	exitWait := durationFlag{d: 10 * time.Second, allowZero: true}
	fs.Var(&port, "target-port", "")
	fifo := fs.String("fifo", "/run/wsdrain/drain.fifo", "")
	fs.Var(&interval, "interval", "")
	fs.Var(&minDrain, "min-drain", "")
	fs.Var(&timeout, "timeout", "")
	fs.Var(&exitWait, "exit-wait", "")
	target := fs.String("target-process", "", "")
	sigName := fs.String("signal", "TERM", "")
	source := sourceFlag("auto")
	fs.Var(&source, "source", "")
	exclude := addExclusionFlags(fs)
	if err := parseFlags(fs, stopperHelp, args, stdout); err != nil {
		return stopperConfig{}, err
	}
	sig, err := parseSignal(*sigName)
	if err != nil {
		return stopperConfig{}, err
	}
	ex, err := exclude.exclusions("stopper", source)
	if err != nil {
		return stopperConfig{}, err
	}
	return stopperConfig{uint16(port), *fifo, interval.d, minDrain.d, timeout.d, exitWait.d, *target, sig, source, ex}, nil
}

// runStopper wires the stopper to the real kernel tables, /proc and pipe.
func runStopper(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, err := parseStopperFlags(args, stdout)
	if err != nil {
		return err
	}
	pipe := newFIFOWriter(cfg.fifo)
	defer pipe.close()
	log := slog.New(slog.NewMultiHandler(
		slog.NewTextHandler(stderr, nil),
		slog.NewTextHandler(pipe, nil).WithAttrs([]slog.Attr{slog.String("source", "stopper")}),
	))
	fs := procFS{root: "/proc"}
	source, err := openSource(cfg.source, cfg.exclude, func(msg string, err error) { log.Warn(msg, "err", err) })
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
		app: &appSignaller{
			fs:       fs,
			finder:   targetFinder{fs: fs, source: source, port: cfg.port, comm: cfg.targetProcess, protect: fs.ancestors(os.Getpid())},
			record:   record,
			lockWait: recordLockWait,
			sig:      cfg.signal,
			log:      log,
		},
		ownPIDNamespace: fs.ownPIDNamespace(),
		record:          record,
		listening: func() (bool, error) {
			inodes, err := source.listeners(cfg.port)
			return len(inodes) > 0, err
		},
	}
	return s.run(ctx)
}

// subscribeIfNetlink subscribes to the kernel's socket destroy events when
// counts come from netlink. It returns no waiter, and the stopper polls only,
// with /proc (which must keep working where netlink is refused) or when the
// subscription is refused; that is logged once.
func subscribeIfNetlink(source string, port uint16, log *slog.Logger) (eventWaiter, func()) {
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
	return destroyWait(wake), stop
}

// eventWaiter sleeps for at most d and reports whether a destroy event on
// the target port cut the sleep short.
type eventWaiter interface {
	wait(ctx context.Context, d time.Duration) (woken bool, err error)
}

// destroyWait is the real eventWaiter: a value on the channel is an event.
type destroyWait <-chan struct{}

func (w destroyWait) wait(ctx context.Context, d time.Duration) (woken bool, err error) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return false, nil
	case <-w:
		return true, nil
	case <-ctx.Done():
		return false, ctx.Err()
	}
}

// stopper is the drain loop; its boundaries are fields so tests can drive it.
type stopper struct {
	cfg    stopperConfig
	log    *slog.Logger
	source string               // where counts come from, for the log
	events eventWaiter          // nil: no destroy events, poll only
	cpu    func() time.Duration // CPU used so far; read only with events
	count  func() (tally, error)
	notify func(msg string) error
	now    func() time.Time
	sleep  func(ctx context.Context, d time.Duration) error
	app    interface {
		prepare() // look for the app ahead, while the calls go on
		signal(ctx context.Context) ([]process, error)
		waitExit(ctx context.Context, ps []process, limit time.Duration, sleep func(context.Context, time.Duration) error) bool
	}
	// ownPIDNamespace: the app is out of sight and the kubelet signals it;
	// listening then tells when the app has exited.
	ownPIDNamespace bool
	listening       func() (bool, error)
	record          signalLog // notes a release there, for a repeated run; no path: nowhere

	// The rate limit of counts that answer events (owed).
	debt   time.Duration
	debtAt time.Time

	drained bool // the proxy has taken "drain"
}

func (s *stopper) run(ctx context.Context) error {
	begun := s.now()
	s.log.Info("stopper started", "version", buildVersion(), "target_port", s.cfg.port,
		"min_drain", s.cfg.minDrain, "timeout", s.cfg.timeout, "counts_from", s.source, "events", onOff(s.events != nil),
		"not_calls", s.cfg.exclude.String(), "pid_namespace", pidNamespaceName(s.ownPIDNamespace))
	if err := s.tellDrain(); err != nil {
		s.log.Warn("could not tell the proxy to drain; retrying at each count", "err", err)
	}
	if !s.ownPIDNamespace {
		s.app.prepare() // the fds of every process are read now, not at the zero
	}
	if err := s.waitForCalls(ctx, begun); err != nil {
		return err
	}
	if s.ownPIDNamespace {
		return s.leaveSignalToKubelet(ctx)
	}
	signalled, err := s.app.signal(ctx)
	// Release the app's preStop even when signalling failed: the kubelet's
	// own SIGTERM then reaches the app, and the calls are over either way.
	rerr := s.release(ctx)
	if err != nil {
		s.log.Error("could not signal the app", "err", err)
		return err
	}
	if len(signalled) > 0 && !s.app.waitExit(ctx, signalled, s.cfg.exitWait, s.sleep) {
		s.log.Warn("app still running after the signal; the kubelet takes over", "waited", s.cfg.exitWait)
	}
	return rerr
}

// tellDrain sends "drain" unless the proxy has taken it. A full pipe or a
// proxy not reading yet is retried at each count, so that neither holds up
// the counting.
func (s *stopper) tellDrain() error {
	if s.drained {
		return nil
	}
	err := s.notify("drain")
	s.drained = err == nil
	return err
}

// release sends "done" (after "drain", if that has not got through yet),
// retrying with a backoff that grows to --interval for up to --exit-wait,
// the hook's time after the drain: --timeout may be unset, and a pod whose
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

// waitForCalls returns once no call is left and -min-drain has passed, or
// at -timeout. A count it could not read never counts as zero, and a zero
// is read twice before it is believed: neither /proc nor a netlink dump is
// a snapshot of the socket tables, so one reading can miss a socket.
func (s *stopper) waitForCalls(ctx context.Context, begun time.Time) error {
	r := countReporter{log: s.log, last: tally{calls: -1}}
	afterEvent := false // whether this count answers a destroy event
	for {
		t, cost, err := s.timedCount()
		if afterEvent {
			s.charge(cost)
		}
		elapsed := s.now().Sub(begun)
		if err == nil && t.calls == 0 && elapsed >= s.cfg.minDrain {
			t, err = s.secondReading(elapsed)
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

// timedCount counts and, when events can trigger counts (they are spaced
// by it), says what the count cost in CPU time. CPU, not the clock: on a
// busy node a cheap count can take long, and it would hold back the next.
func (s *stopper) timedCount() (t tally, cost time.Duration, err error) {
	if s.events == nil {
		t, err = s.count()
		return t, 0, err
	}
	before := s.cpu()
	t, err = s.count()
	return t, s.cpu() - before, err
}

// processCPU is the CPU time, user and system, this process has used.
func processCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// secondReading counts again after a zero; what it reads stands.
func (s *stopper) secondReading(elapsed time.Duration) (tally, error) {
	t, err := s.count()
	if err != nil || t.calls != 0 {
		s.log.Warn("a zero count was not confirmed by a second reading; waiting",
			"connections", countAttr(t.calls, err), "elapsed", elapsed.Round(time.Millisecond))
	}
	return t, err
}

// recountGap is how many times its CPU cost a count that answered an event
// must be paid back in wall time before events may trigger counts freely:
// counts that answer events use at most a twentieth of a core in the long
// run (ten times left the stopper just over a tenth, BENCHMARKS.md).
const recountGap = 20

// recountBurst is the credit, in wall time, that a quiet spell builds up:
// counts answering events run at once until they have used it. A count
// costs what walking the kernel's socket hash table costs, which depends on
// the node, not on the calls left (0.7 ms on an idle node, 11 ms with 10 000
// other connections): without credit, the last two calls ending a few
// milliseconds apart would have the second wait twenty times that.
const recountBurst = time.Second

// charge adds what a count that answered an event owes.
func (s *stopper) charge(cost time.Duration) { s.owed(); s.debt += recountGap * cost }

// owed is the wall time the counts that answered events still owe;
// negative, it is credit, at most recountBurst.
func (s *stopper) owed() time.Duration {
	now := s.now()
	if s.debtAt.IsZero() {
		s.debt = -recountBurst
	} else {
		s.debt = max(s.debt-now.Sub(s.debtAt), -recountBurst)
	}
	s.debtAt = now
	return s.debt
}

// pause waits until the next poll, d, or until a destroy event on the
// target port, and reports whether an event ended it. An event is answered
// at once while there is credit, else once the debt is paid (never later
// than the poll): however fast calls end, counts answering events stay
// within 1/recountGap of a core, plus the burst.
func (s *stopper) pause(ctx context.Context, d time.Duration) (woken bool, err error) {
	if s.events == nil {
		return false, s.sleep(ctx, d)
	}
	from := s.now()
	if woken, err = s.events.wait(ctx, d); err != nil || !woken {
		return woken, err
	}
	if rest := min(s.owed(), d-s.now().Sub(from)); rest > 0 {
		return true, s.sleep(ctx, rest)
	}
	return true, nil
}

// nextWait is one interval, cut short to land on -min-drain or -timeout.
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

// countReporter logs every change of the tally, and a reminder each minute.
type countReporter struct {
	log        *slog.Logger
	last       tally
	lastErr    string
	lastLogged time.Duration
}

func (r *countReporter) report(t tally, err error, elapsed time.Duration) {
	at := elapsed.Round(time.Millisecond)
	switch {
	case err != nil && err.Error() != r.lastErr:
		r.log.Warn("connection count unknown; waiting, not signalling", "err", err, "elapsed", at)
	case err == nil && t != r.last:
		r.log.Info("connections open", "count", t.calls, "excluded_peer", t.excludedPeer,
			"excluded_idle", t.excludedIdle, "elapsed", at)
	case elapsed-r.lastLogged >= time.Minute:
		r.log.Info("still draining", "connections", countAttr(t.calls, err), "elapsed", at)
	default:
		return
	}
	r.lastLogged = elapsed
	r.last, r.lastErr = t, ""
	if err != nil {
		r.last, r.lastErr = tally{calls: -1}, err.Error()
	}
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

func countAttr(n int, err error) string {
	if err != nil {
		return "unknown"
	}
	return fmt.Sprint(n)
}

// sleepCtx sleeps for d or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

const countHelp = `usage: wsdrain count [flags]

Prints one integer: the ESTABLISHED connections whose local port is
-target-port, in this network namespace, less those the -ignore flags leave
out. Run it with kubectl exec in the sidecar to see the live calls.

example:
  kubectl exec POD -c wsdrain -- /wsdrain count --target-port 8080 --ignore-peer 10.0.5.7

flags:
` + countFlagsHelp + `
exit status: 0 printed, 1 the socket tables could not be read, 2 bad usage.
`

// countFlagsHelp is the help of the flags that say what counts as a call,
// the same for count and for the proxy's GET /metrics, which must count as
// the stopper does.
const countFlagsHelp = `  -target-port N          the app's port (default 8080)
  -source S               netlink, proc or auto (default auto: netlink unless refused)
  -ignore-peer CIDR       connections from this network are not calls; repeatable;
                          an IPv4 network also matches IPv4-mapped IPv6 remotes
  -ignore-idle D          connections with no data either way for D are not calls;
                          D at least 1s and above the app's own ping period; needs
                          netlink (default 0: off)
`

func runCount(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("count", flag.ContinueOnError)
	port := portFlag(8080)
	fs.Var(&port, "target-port", "")
	source := sourceFlag("auto")
	fs.Var(&source, "source", "")
	exclude := addExclusionFlags(fs)
	if err := parseFlags(fs, countHelp, args, stdout); err != nil {
		return err
	}
	ex, err := exclude.exclusions("count", source)
	if err != nil {
		return err
	}
	warn := func(msg string, err error) { fmt.Fprintf(stderr, "wsdrain: %s: %v\n", msg, err) }
	src, err := openSource(source, ex, warn)
	if err != nil {
		return fmt.Errorf("count: %w", err)
	}
	t, err := src.established(uint16(port), ex)
	if err != nil {
		return fmt.Errorf("count: %w", err)
	}
	fmt.Fprintln(stdout, t.calls)
	return nil
}
