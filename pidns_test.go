package main

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

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
			[]string{"pid_namespace=private", "the kubelet delivers the stop signal", `msg="app exited" within=200ms`}},
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
				app:             &recordingApp{clock: clock, events: &events},
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
		app:             &recordingApp{clock: clock, events: &events},
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
			app:             &recordingApp{clock: clock, events: &events},
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

// TestOwnPIDNamespace: only PID 1 in the stopper's own mount namespace means
// a private PID namespace; anything unreadable means shared.
func TestOwnPIDNamespace(t *testing.T) {
	tests := []struct {
		name       string
		self, init string // ns/mnt link targets; "" leaves the link out
		want       bool
	}{
		{"PID 1 is in this container", "mnt:[4026532301]", "mnt:[4026532301]", true},
		{"PID 1 is the pod's pause", "mnt:[4026532301]", "mnt:[4026532287]", false},
		{"PID 1 unreadable", "mnt:[4026532301]", "", false},
		{"no /proc/self", "", "mnt:[4026532301]", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			for dir, target := range map[string]string{"self": tt.self, "1": tt.init} {
				if target == "" {
					continue
				}
				if err := os.MkdirAll(filepath.Join(root, dir, "ns"), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.Symlink(target, filepath.Join(root, dir, "ns", "mnt")); err != nil {
					t.Fatal(err)
				}
			}
			if got := (procFS{root: root}).ownPIDNamespace(); got != tt.want {
				t.Errorf("ownPIDNamespace() = %v, want %v", got, tt.want)
			}
		})
	}
}
