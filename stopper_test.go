package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// fakeClock advances only when the stopper sleeps.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time { return c.t }
func (c *fakeClock) sleep(ctx context.Context, d time.Duration) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	c.t = c.t.Add(d)
	return nil
}

// recordingApp records when it was signalled.
type recordingApp struct {
	clock     *fakeClock
	signalled time.Time
	signalErr error
	events    *[]string
}

func (a *recordingApp) signal(context.Context) ([]process, error) {
	a.signalled = a.clock.now()
	*a.events = append(*a.events, "signal")
	return nil, a.signalErr
}

// counts is a script of count results, one per poll; the last one repeats.
type countResult struct {
	n   int
	err error
}

func runScriptedStopper(t *testing.T, cfg stopperConfig, script []countResult) (time.Duration, []string, *strings.Builder, error) {
	t.Helper()
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := &fakeClock{t: start}
	var events []string
	var log strings.Builder
	app := &recordingApp{clock: clock, events: &events}
	polls := 0
	s := &stopper{
		cfg: cfg,
		log: slog.New(slog.NewTextHandler(&log, nil)),
		count: func() (tally, error) {
			r := script[min(polls, len(script)-1)]
			polls++
			if polls > 100_000 {
				t.Fatal("stopper never stopped polling")
			}
			return tally{calls: r.n}, r.err
		},
		notify: func(msg string) error { events = append(events, msg); return nil },
		now:    clock.now,
		sleep:  clock.sleep,
		signal: app.signal,
	}
	err := s.run(context.Background())
	if app.signalled.IsZero() {
		return -1, events, &log, err
	}
	return app.signalled.Sub(start), events, &log, err
}

func TestStopperSignalsOnlyAfterTheLastCall(t *testing.T) {
	cfg := stopperConfig{interval: time.Second, minDrain: 5 * time.Second}
	unknown := errors.New("malformed table")
	tests := []struct {
		name   string
		cfg    stopperConfig
		script []countResult
		want   time.Duration // when the app is signalled
	}{
		{"idle pod waits for -min-drain", cfg, []countResult{{0, nil}}, 5 * time.Second},
		{"calls end after -min-drain", cfg, []countResult{{3, nil}, {3, nil}, {2, nil}, {2, nil}, {2, nil}, {2, nil}, {2, nil}, {1, nil}, {1, nil}, {0, nil}}, 9 * time.Second},
		{"a call that arrives during -min-drain is waited for", cfg, []countResult{{0, nil}, {0, nil}, {1, nil}, {1, nil}, {1, nil}, {1, nil}, {1, nil}, {1, nil}, {0, nil}}, 8 * time.Second},
		{"unknown count is never zero", cfg, []countResult{{1, nil}, {0, unknown}, {0, unknown}, {0, unknown}, {0, unknown}, {0, unknown}, {0, unknown}, {0, nil}}, 7 * time.Second},
		{"timeout signals with calls open", stopperConfig{interval: time.Second, minDrain: 5 * time.Second, timeout: 30 * time.Second}, []countResult{{2, nil}}, 30 * time.Second},
		{"timeout signals when the count stays unknown", stopperConfig{interval: time.Second, timeout: 10 * time.Second}, []countResult{{0, unknown}}, 10 * time.Second},
		{"timeout lands exactly, between intervals", stopperConfig{interval: 7 * time.Second, timeout: 10 * time.Second}, []countResult{{1, nil}}, 10 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, events, log, err := runScriptedStopper(t, tt.cfg, tt.script)
			if err != nil {
				t.Fatalf("stopper: %v", err)
			}
			if got != tt.want {
				t.Errorf("app signalled at %v, want %v\n%s", got, tt.want, log)
			}
			if !slices.Equal(events, []string{"drain", "signal", "done"}) {
				t.Errorf("events %q; want drain, then the signal, then done", events)
			}
		})
	}
}

func TestStopperLogsCountChangesAndTimeout(t *testing.T) {
	cfg := stopperConfig{interval: time.Second, timeout: 4 * time.Second}
	_, _, log, _ := runScriptedStopper(t, cfg, []countResult{{2, nil}, {2, nil}, {1, nil}})
	for _, want := range []string{"count=2", "count=1", "drain timeout", "connections=1"} {
		if !strings.Contains(log.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, log)
		}
	}
	if n := strings.Count(log.String(), "count=2"); n != 1 {
		t.Errorf("an unchanged count was logged %d times, want once", n)
	}
}

func TestStopperReleasesTheAppsPreStopEvenWhenSignallingFails(t *testing.T) {
	start := time.Now()
	clock := &fakeClock{t: start}
	var events []string
	s := &stopper{
		cfg:    stopperConfig{interval: time.Second},
		log:    slog.New(slog.NewTextHandler(io.Discard, nil)),
		count:  func() (tally, error) { return tally{}, nil },
		notify: func(msg string) error { events = append(events, msg); return nil },
		now:    clock.now,
		sleep:  clock.sleep,
		signal: (&recordingApp{clock: clock, events: &events, signalErr: errors.New("nothing listens on port 8080")}).signal,
	}
	if err := s.run(context.Background()); err == nil {
		t.Fatal("a failed signal must fail the hook")
	}
	if !slices.Equal(events, []string{"drain", "signal", "done"}) {
		t.Errorf("events %q; want done after the failed signal", events)
	}
}

func TestStopperGoesOnWithoutAProxy(t *testing.T) {
	clock := &fakeClock{t: time.Now()}
	var events []string
	s := &stopper{
		cfg:    stopperConfig{interval: time.Second},
		log:    slog.New(slog.NewTextHandler(io.Discard, nil)),
		count:  func() (tally, error) { return tally{}, nil },
		notify: func(string) error { return errors.New("fifo has no reader") },
		now:    clock.now,
		sleep:  clock.sleep,
		signal: (&recordingApp{clock: clock, events: &events}).signal,
	}
	err := s.run(context.Background())
	if err == nil || !strings.Contains(err.Error(), "release the app's preStop") || len(events) != 1 {
		t.Fatalf("run = %v, events %q; want the app signalled despite the missing proxy, then an error: its preStop was not released", err, events)
	}
}

// TestStopperConfirmsAZeroBeforeSignalling: a table read while sockets move
// can miss one, so a zero read once, then contradicted, must not signal.
func TestStopperConfirmsAZeroBeforeSignalling(t *testing.T) {
	cfg := stopperConfig{interval: time.Second, timeout: 10 * time.Second}
	got, _, log, err := runScriptedStopper(t, cfg, []countResult{{0, nil}, {1, nil}})
	if err != nil {
		t.Fatalf("stopper: %v", err)
	}
	if got != cfg.timeout {
		t.Errorf("app signalled at %v on a zero that the next reading contradicted; want the %v timeout\n%s", got, cfg.timeout, log)
	}
	if !strings.Contains(log.String(), "not confirmed") {
		t.Errorf("log does not say the zero was not confirmed:\n%s", log)
	}
}

// fakeEvents delivers a destroy event at next on the fake clock, then one
// every period (never again when period is 0).
type fakeEvents struct {
	clock  *fakeClock
	next   time.Time
	period time.Duration
}

func (e *fakeEvents) wait(ctx context.Context, d time.Duration) (bool, error) {
	if e.next.IsZero() || e.next.After(e.clock.t.Add(d)) {
		return false, e.clock.sleep(ctx, d)
	}
	if e.next.After(e.clock.t) {
		e.clock.t = e.next
	}
	e.next = e.next.Add(e.period)
	if e.period == 0 {
		e.next = time.Time{}
	}
	return true, nil
}

// eventStopper is a stopper on a fake clock whose count is a function of
// the time since the start and costs cost of that clock.
func eventStopper(cfg stopperConfig, count func(since time.Duration) int, cost time.Duration) (*stopper, *fakeEvents, *recordingApp, *int) {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := &fakeClock{t: start}
	var events []string
	counts := 0
	app := &recordingApp{clock: clock, events: &events}
	fe := &fakeEvents{clock: clock}
	s := &stopper{
		cfg:    cfg,
		log:    slog.New(slog.NewTextHandler(io.Discard, nil)),
		events: fe.wait,
		cpu:    func() time.Duration { return clock.t.Sub(start) }, // counting is all it does
		count: func() (tally, error) {
			counts++
			n := count(clock.t.Sub(start))
			clock.t = clock.t.Add(cost)
			return tally{calls: n}, nil
		},
		notify: func(string) error { return nil },
		now:    clock.now,
		sleep:  clock.sleep,
		signal: app.signal,
	}
	return s, fe, app, &counts
}

func TestStopperRecountsOnADestroyEvent(t *testing.T) {
	lastClose := 2300 * time.Millisecond
	cfg := stopperConfig{interval: 5 * time.Second}
	s, fe, app, _ := eventStopper(cfg, func(since time.Duration) int {
		if since < lastClose {
			return 1
		}
		return 0
	}, time.Millisecond)
	start := fe.clock.t
	fe.next = start.Add(lastClose)
	if err := s.run(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := app.signalled.Sub(start); got > lastClose+10*time.Millisecond {
		t.Errorf("app signalled at %v; want at the destroy event at %v, not at the next 5s poll", got, lastClose)
	}
}

// TestStopperRateLimitsRecounts: calls ending hundreds of times a second
// must not make an expensive count run hundreds of times a second.
func TestStopperRateLimitsRecounts(t *testing.T) {
	cfg := stopperConfig{interval: 5 * time.Second, timeout: 11 * time.Second}
	cost := 100 * time.Millisecond
	s, fe, _, counts := eventStopper(cfg, func(time.Duration) int { return 50_000 }, cost)
	fe.next, fe.period = fe.clock.t, 5*time.Millisecond
	if err := s.run(context.Background()); err != nil {
		t.Fatal(err)
	}
	// The first count, those the burst pays for, and the one at the
	// timeout; beyond the burst, one count every cost + recountGap*cost.
	if most := int((cfg.timeout+recountBurst)/(cost+recountGap*cost)) + 3; *counts > most {
		t.Errorf("%d counts of %v each in %v of constant events; want at most %d", *counts, cost, cfg.timeout, most)
	}
	if *counts < 5 {
		t.Errorf("only %d counts in %v of constant events; the events were ignored", *counts, cfg.timeout)
	}
}

// TestStopperAnswersTheLastCallsAtOnce: the last two calls end 5 ms apart
// on a node where a count costs 11 ms (10 000 other connections): the
// second close is answered at once, not twenty counts' cost later.
func TestStopperAnswersTheLastCallsAtOnce(t *testing.T) {
	first, second := 2*time.Second, 2*time.Second+5*time.Millisecond
	cost := 11 * time.Millisecond
	s, fe, app, _ := eventStopper(stopperConfig{interval: 5 * time.Second}, func(since time.Duration) int {
		switch {
		case since < first:
			return 2
		case since < second:
			return 1
		}
		return 0
	}, cost)
	start := fe.clock.t
	fe.next, fe.period = start.Add(first), second-first
	if err := s.run(context.Background()); err != nil {
		t.Fatal(err)
	}
	// The count that sees the zero and the second reading: two costs.
	if got := app.signalled.Sub(start) - second; got > 3*cost {
		t.Errorf("app signalled %v after the last close; want within %v (two counts)", got, 3*cost)
	}
}

// TestStopperLogsWhatItLeavesOut: the start says what is not a call, and
// each change says how many connections were left out and why.
func TestStopperLogsWhatItLeavesOut(t *testing.T) {
	clock := &fakeClock{t: time.Now()}
	var events []string
	var log strings.Builder
	script := []tally{{calls: 2, excludedPeer: 1}, {calls: 2, excludedPeer: 1}, {calls: 0, excludedPeer: 1, excludedIdle: 1}}
	polls := 0
	ex := exclusions{peers: []netip.Prefix{netip.MustParsePrefix("10.0.5.7/32")}, idle: 30 * time.Second}
	s := &stopper{
		cfg: stopperConfig{interval: time.Second, calls: calls{exclude: ex}},
		log: slog.New(slog.NewTextHandler(&log, nil)),
		count: func() (tally, error) {
			polls++
			return script[min(polls-1, len(script)-1)], nil
		},
		notify: func(msg string) error { return nil },
		now:    clock.now,
		sleep:  clock.sleep,
		signal: (&recordingApp{clock: clock, events: &events}).signal,
	}
	if err := s.run(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`not_calls="peers in 10.0.5.7/32, connections idle for 30s"`,
		"count=2 excluded_peer=1 excluded_idle=0",
		"count=0 excluded_peer=1 excluded_idle=1",
	} {
		if !strings.Contains(log.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, log.String())
		}
	}
	if n := strings.Count(log.String(), "count=2"); n != 1 {
		t.Errorf("an unchanged tally was logged %d times, want once", n)
	}
}

// TestStopperInItsOwnPIDNamespaceSignalsNothing: where the app is out of
// sight, the drain is the same, "done" comes at zero or at -timeout, nothing
// is signalled, and the app's exit is seen as its listener closing.
func TestStopperInItsOwnPIDNamespaceSignalsNothing(t *testing.T) {
	lookupFailed := errors.New("netlink sock_diag reply: timeout")
	cfg := stopperConfig{interval: time.Second, minDrain: 5 * time.Second, timeout: 30 * time.Second, exitWait: 10 * time.Second}
	tests := []struct {
		name      string
		counts    []countResult
		listening []countResult // n > 0: still listening, per lookup; the last repeats
		wantDone  time.Duration // when "done" is sent
		wantLog   []string
	}{
		{"done at zero; exit seen when the listener closes", []countResult{{2, nil}, {1, nil}, {1, nil}, {1, nil}, {1, nil}, {1, nil}, {0, nil}},
			[]countResult{{1, nil}, {1, nil}, {1, nil}, {0, nil}}, 6 * time.Second,
			[]string{"pid_namespace=private", "the kubelet delivers the stop signal", `msg="app exited" within=200ms seen_as="its listening socket closed"`}},
		{"done at -timeout with a call open", []countResult{{1, nil}},
			[]countResult{{1, nil}, {0, nil}}, 30 * time.Second,
			[]string{"drain timeout", "connections=1", `msg="app exited" within=0s`}},
		{"an app that keeps listening is left to the kubelet after -exit-wait", []countResult{{0, nil}},
			[]countResult{{1, nil}}, 5 * time.Second,
			[]string{"app still listening; the kubelet takes over", "waited=10s"}},
		{"a failed lookup is not an exit", []countResult{{0, nil}},
			[]countResult{{1, nil}, {1, nil}, {0, lookupFailed}, {0, lookupFailed}, {0, nil}}, 5 * time.Second,
			[]string{`msg="app exited" within=300ms`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
			clock := &fakeClock{t: start}
			var events []string
			var done time.Time
			var log strings.Builder
			counts, lookups := 0, 0
			s := &stopper{
				cfg: cfg,
				log: slog.New(slog.NewTextHandler(&log, nil)),
				count: func() (tally, error) {
					r := tt.counts[min(counts, len(tt.counts)-1)]
					counts++
					return tally{calls: r.n}, r.err
				},
				notify: func(msg string) error {
					events = append(events, msg)
					if msg == "done" {
						done = clock.now()
					}
					return nil
				},
				now:             clock.now,
				sleep:           clock.sleep,
				signal:          (&recordingApp{clock: clock, events: &events}).signal,
				ownPIDNamespace: true,
				listening: func() (bool, error) {
					r := tt.listening[min(lookups, len(tt.listening)-1)]
					lookups++
					return r.n > 0, r.err
				},
			}
			if err := s.run(context.Background()); err != nil {
				t.Fatalf("stopper: %v\n%s", err, &log)
			}
			if !slices.Equal(events, []string{"drain", "done"}) {
				t.Errorf("events %q; want drain, then done, and no signal", events)
			}
			if got := done.Sub(start); got != tt.wantDone {
				t.Errorf("done sent at %v, want %v\n%s", got, tt.wantDone, &log)
			}
			for _, want := range tt.wantLog {
				if !strings.Contains(log.String(), want) {
					t.Errorf("log lacks %q:\n%s", want, &log)
				}
			}
		})
	}
}

// TestStopperInItsOwnPIDNamespaceRefusesAPortNobodyListensOn: a wrong
// --target-port counts zero at once; in the shared shape that is the error
// "nothing listens on port N", and here too it must not pass for a drain
// and an exit ("app exited within=0s", exit 0) while the app's real port
// still holds calls.
func TestStopperInItsOwnPIDNamespaceRefusesAPortNobodyListensOn(t *testing.T) {
	clock := &fakeClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	var events []string
	var log strings.Builder
	s := &stopper{
		cfg:             stopperConfig{calls: calls{port: 8090}, interval: time.Second, minDrain: 5 * time.Second, exitWait: 10 * time.Second},
		log:             slog.New(slog.NewTextHandler(&log, nil)),
		count:           func() (tally, error) { return tally{}, nil },
		notify:          func(msg string) error { events = append(events, msg); return nil },
		now:             clock.now,
		sleep:           clock.sleep,
		signal:          (&recordingApp{clock: clock, events: &events}).signal,
		ownPIDNamespace: true,
		listening:       func() (bool, error) { return false, nil },
	}
	err := s.run(context.Background())
	if err == nil || !strings.Contains(err.Error(), "nothing listens on port 8090") {
		t.Errorf("stopper on a port nobody listens on: %v; want the error, as in the shared shape\n%s", err, &log)
	}
	if strings.Contains(log.String(), "app exited") {
		t.Errorf("the log claims the app exited:\n%s", &log)
	}
	if !slices.Equal(events, []string{"drain", "done"}) {
		t.Errorf("events %q; want drain, then done (the app's preStop released all the same)", events)
	}
}

// TestStopperInItsOwnPIDNamespaceRunTwice: a hook run again after the app
// exited (the kubelet restarted mid-termination, say) finds nothing
// listening; the record of the first run's release makes that no error.
func TestStopperInItsOwnPIDNamespaceRunTwice(t *testing.T) {
	record := signalLog{path: filepath.Join(t.TempDir(), "wsdrain.signalled")}
	for i, appListens := range []bool{true, false} {
		clock := &fakeClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
		var events []string
		var log strings.Builder
		lookups := 0
		s := &stopper{
			cfg:    stopperConfig{calls: calls{port: 8080}, interval: time.Second, exitWait: time.Second},
			log:    slog.New(slog.NewTextHandler(&log, nil)),
			count:  func() (tally, error) { return tally{}, nil },
			notify: func(msg string) error { events = append(events, msg); return nil },
			now:    clock.now, sleep: clock.sleep,
			signal:          (&recordingApp{clock: clock, events: &events}).signal,
			ownPIDNamespace: true,
			record:          record,
			listening: func() (bool, error) {
				lookups++
				return appListens && lookups == 1, nil // the first run's app exits on its release
			},
		}
		if err := s.run(context.Background()); err != nil {
			t.Fatalf("run %d: %v\n%s", i+1, err, &log)
		}
		if !slices.Equal(events, []string{"drain", "done"}) {
			t.Errorf("run %d: events %q", i+1, events)
		}
	}
}

// TestStopperWaitsForTheSignalledAppToExit: after the signal, the stopper
// says when the app exited, or that the kubelet takes over at --exit-wait.
func TestStopperWaitsForTheSignalledAppToExit(t *testing.T) {
	for _, tt := range []struct {
		checks int // alive answers true this many times
		want   string
	}{
		{2, `msg="app exited" within=200ms`},
		{1000, `msg="app still running after the signal; the kubelet takes over" waited=1s`},
	} {
		clock := &fakeClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
		var log strings.Builder
		checks := 0
		s := &stopper{
			cfg:    stopperConfig{interval: time.Second, exitWait: time.Second},
			log:    slog.New(slog.NewTextHandler(&log, nil)),
			count:  func() (tally, error) { return tally{}, nil },
			notify: func(string) error { return nil },
			now:    clock.now, sleep: clock.sleep,
			signal: func(context.Context) ([]process, error) { return []process{{pid: 42}}, nil },
			alive:  func(process) bool { checks++; return checks <= tt.checks },
		}
		if err := s.run(context.Background()); err != nil || !strings.Contains(log.String(), tt.want) {
			t.Errorf("run = %v; log lacks %q:\n%s", err, tt.want, &log)
		}
	}
}

// proxyPipe makes the drain pipe at path, with the test as the proxy that
// holds it open; full, another writer has filled it to the brim. read
// empties the pipe and returns the messages it has held so far.
func proxyPipe(t *testing.T, path string, full bool) (read func() []string) {
	t.Helper()
	if err := syscall.Mkfifo(path, 0o600); err != nil {
		t.Fatal(err)
	}
	fd, err := syscall.Open(path, syscall.O_RDWR|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	filler := bytes.Repeat([]byte("x"), maxMessage)
	for _, chunk := range [][]byte{filler, filler[:1]} { // pages, then the last page's tail
		for full {
			if _, err := syscall.Write(fd, chunk); err != nil {
				break
			}
		}
	}
	var held []byte
	return func() []string {
		buf := make([]byte, 1<<16)
		for {
			n, err := syscall.Read(fd, buf)
			if err != nil || n <= 0 {
				break
			}
			held = append(held, buf[:n]...)
		}
		var msgs []string
		readFIFO(bytes.NewReader(held), func(msg []byte, whole bool) {
			if whole && (string(msg) == "drain" || string(msg) == "done") {
				msgs = append(msgs, string(msg))
			}
		})
		return msgs
	}
}

// TestStopperGetsDrainAndDoneThroughAFullPipe: with the pipe full when the
// stopper starts (something else filled it, or the proxy is slow to read),
// the proxy must still get "drain" (while calls are open, if it reads by
// then) and "done" once it reads again, and the retries must not hold up the
// count: the app is signalled within an --interval of the last call.
func TestStopperGetsDrainAndDoneThroughAFullPipe(t *testing.T) {
	const lastCall = 2 * time.Second
	for _, tt := range []struct {
		name              string
		readsFrom         time.Duration
		drainedWhileCalls bool
	}{
		{"the proxy reads again while calls are open", 300 * time.Millisecond, true},
		{"the proxy reads again after the last call", lastCall + 300*time.Millisecond, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "drain.fifo")
			read := proxyPipe(t, path, true)
			start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
			clock := &fakeClock{t: start}
			var events, whileCalls []string
			var log strings.Builder
			app := &recordingApp{clock: clock, events: &events}
			s := &stopper{
				cfg: stopperConfig{interval: time.Second, exitWait: 10 * time.Second},
				log: slog.New(slog.NewTextHandler(&log, nil)),
				count: func() (tally, error) {
					if clock.t.Sub(start) < lastCall {
						return tally{calls: 1}, nil
					}
					return tally{}, nil
				},
				notify: newFIFOWriter(path).send,
				now:    clock.now,
				sleep: func(ctx context.Context, d time.Duration) error {
					before := clock.t.Sub(start)
					err := clock.sleep(ctx, d)
					if clock.t.Sub(start) >= tt.readsFrom { // the proxy reads during this wait
						if got := read(); before < lastCall {
							whileCalls = got
						}
					}
					return err
				},
				signal: app.signal,
			}
			if err := s.run(context.Background()); err != nil {
				t.Fatalf("stopper: %v\n%s", err, &log)
			}
			if got := read(); !slices.Equal(got, []string{"drain", "done"}) {
				t.Errorf("the proxy got %q; want drain, then done\n%s", got, &log)
			}
			if tt.drainedWhileCalls && !slices.Contains(whileCalls, "drain") {
				t.Errorf("the proxy read the pipe from %v but had no drain before the last call at %v: readiness stayed 200", tt.readsFrom, lastCall)
			}
			if got := app.signalled.Sub(start); got < lastCall || got > lastCall+s.cfg.interval {
				t.Errorf("app signalled at %v; want within an --interval of the last call at %v", got, lastCall)
			}
		})
	}
}

// TestStopperFailsWhenDoneNeverGetsThrough: a pipe that stays full keeps the
// app's preStop held; the stopper must say so with a non-zero exit, after
// retrying for --exit-wait, in both shapes of pod.
func TestStopperFailsWhenDoneNeverGetsThrough(t *testing.T) {
	for _, own := range []bool{false, true} {
		t.Run(map[bool]string{true: "private", false: "shared"}[own], func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "drain.fifo")
			read := proxyPipe(t, path, true)
			start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
			clock := &fakeClock{t: start}
			var events []string
			var log strings.Builder
			s := &stopper{
				cfg:             stopperConfig{calls: calls{port: 8080}, interval: time.Second, exitWait: 10 * time.Second},
				log:             slog.New(slog.NewTextHandler(&log, nil)),
				count:           func() (tally, error) { return tally{}, nil },
				notify:          newFIFOWriter(path).send,
				now:             clock.now,
				sleep:           clock.sleep,
				signal:          (&recordingApp{clock: clock, events: &events}).signal,
				ownPIDNamespace: own,
				listening:       func() (bool, error) { return true, nil },
			}
			err := s.run(context.Background())
			if err == nil || !strings.Contains(err.Error(), "release the app's preStop") {
				t.Fatalf("stopper with a pipe that stays full: %v; want an error saying the app's preStop was not released\n%s", err, &log)
			}
			if took := clock.t.Sub(start); took < s.cfg.exitWait || took > 2*s.cfg.exitWait+s.cfg.interval {
				t.Errorf("the stopper gave up after %v; want after retrying for --exit-wait (%v)", took, s.cfg.exitWait)
			}
			if got := read(); len(got) != 0 {
				t.Errorf("the proxy got %q from a pipe that stayed full", got)
			}
		})
	}
}

// TestStopperTellsTheProxysLogOfBadUsage: the kubelet throws a preStop's
// output away, so a stopper started with a mistake in its flags must say so
// in the proxy's log, where kubectl logs shows it.
func TestStopperTellsTheProxysLogOfBadUsage(t *testing.T) {
	app := newFakeApp(t)
	fifo := filepath.Join(t.TempDir(), "drain.fifo")
	p := startProxy(t, app.URL+"/healthz", fifo)
	cmd := wsdrainCmd("stopper", "--fifo", fifo, "--timeout", "10")
	if err := cmd.Run(); cmd.ProcessState == nil || cmd.ProcessState.ExitCode() != 2 {
		t.Fatalf("stopper with a bad --timeout: %v, want exit status 2", err)
	}
	waitFor(t, "the usage error in the proxy's log", func() bool {
		return strings.Contains(p.out.String(), "level=ERROR") && strings.Contains(p.out.String(), "--timeout")
	})
}
