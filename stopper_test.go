package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"slices"
	"strings"
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

// fakeApp records when it was signalled.
type recordingApp struct {
	clock     *fakeClock
	signalled time.Time
	signalErr error
	events    *[]string
}

func (a *recordingApp) signal() ([]process, error) {
	a.signalled = a.clock.now()
	*a.events = append(*a.events, "signal")
	return []process{{pid: 42}}, a.signalErr
}

func (a *recordingApp) waitExit(context.Context, []process, time.Duration, func(context.Context, time.Duration) error) bool {
	return true
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
		count: func() (int, error) {
			r := script[min(polls, len(script)-1)]
			polls++
			if polls > 100_000 {
				t.Fatal("stopper never stopped polling")
			}
			return r.n, r.err
		},
		notify: func(msg string) error { events = append(events, msg); return nil },
		now:    clock.now,
		sleep:  clock.sleep,
		app:    app,
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
		count:  func() (int, error) { return 0, nil },
		notify: func(msg string) error { events = append(events, msg); return nil },
		now:    clock.now,
		sleep:  clock.sleep,
		app:    &recordingApp{clock: clock, events: &events, signalErr: errors.New("nothing listens on port 8080")},
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
		count:  func() (int, error) { return 0, nil },
		notify: func(string) error { return errors.New("fifo has no reader") },
		now:    clock.now,
		sleep:  clock.sleep,
		app:    &recordingApp{clock: clock, events: &events},
	}
	if err := s.run(context.Background()); err != nil || len(events) != 1 {
		t.Fatalf("run = %v, events %q; want the app signalled despite the missing proxy", err, events)
	}
}
