package main

import (
	"bytes"
	"context"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// TestMain lets the test binary be the real program: with WSDRAIN_TEST_ROLE
// set it runs as wsdrain itself (or as the demo app of the namespace test),
// so the end-to-end tests need no build step.
func TestMain(m *testing.M) {
	role := os.Getenv("WSDRAIN_TEST_ROLE")
	switch {
	case role == "wsdrain":
		main()
	case testRoles[role] != nil:
		os.Exit(testRoles[role](os.Args[1:]))
	}
	os.Exit(m.Run())
}

// testRoles are the other programs the test binary can be (the demo app,
// the benchmark's connection holder); the Linux-only test files add them.
var testRoles = map[string]func(args []string) int{}

// wsdrainCmd is an exec.Cmd that runs this test binary as wsdrain.
func wsdrainCmd(args ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "WSDRAIN_TEST_ROLE=wsdrain")
	return cmd
}

func TestCommandLine(t *testing.T) {
	tests := []struct {
		name     string
		args     []string
		code     int
		inStdout string
		inStderr string
	}{
		{"no mode prints usage", nil, 2, "", "usage:"},
		{"help names every mode", []string{"-h"}, 0, "wsdrain count", ""},
		{"--help too", []string{"--help"}, 0, "wsdrain proxy", ""},
		{"help too", []string{"help"}, 0, "wsdrain stopper", ""},
		{"unknown mode", []string{"drain"}, 2, "", `unknown mode "drain"`},
		{"version", []string{"version"}, 0, "wsdrain ", ""},
		{"mode help", []string{"stopper", "-h"}, 0, "--min-drain", ""},
		{"unknown flag", []string{"stopper", "--bogus"}, 2, "", "-bogus"},
		{"port not a number", []string{"stopper", "--target-port", "http"}, 2, "", "-target-port"},
		{"port out of range", []string{"count", "--target-port", "65536"}, 2, "", "-target-port"},
		{"port zero", []string{"stopper", "-target-port=0"}, 2, "", "-target-port"},
		{"negative duration", []string{"stopper", "--timeout", "-5s"}, 2, "", "-timeout"},
		{"zero interval", []string{"stopper", "--interval", "0s"}, 2, "", "-interval"},
		{"bad duration", []string{"stopper", "--min-drain", "5"}, 2, "", "-min-drain"},
		{"SIGKILL refused", []string{"stopper", "--signal", "KILL"}, 2, "", "-signal"},
		{"relative health URL", []string{"proxy", "--health-url", "/healthz"}, 2, "", "-health-url"},
		{"non-http health URL", []string{"proxy", "--health-url", "ftp://127.0.0.1/x"}, 2, "", "-health-url"},
		{"bad listen address", []string{"proxy", "--listen", "8081"}, 2, "", "-listen"},
		{"stray argument", []string{"count", "8080"}, 2, "", "unexpected argument"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := exitCode(run(context.Background(), tt.args, &stdout, &stderr), &stderr)
			if code != tt.code {
				t.Errorf("exit code %d, want %d (stderr %q)", code, tt.code, stderr.String())
			}
			if !strings.Contains(stdout.String(), tt.inStdout) {
				t.Errorf("stdout %q does not contain %q", stdout.String(), tt.inStdout)
			}
			if !strings.Contains(stderr.String(), tt.inStderr) {
				t.Errorf("stderr %q does not contain %q", stderr.String(), tt.inStderr)
			}
			if tt.code == 2 && len(tt.args) > 0 && strings.Count(stderr.String(), "\n") != 1 {
				t.Errorf("a usage error should be one line, got %q", stderr.String())
			}
		})
	}
}

// TestRealBinaryExitCodes runs the program as a process, as a shell would.
func TestRealBinaryExitCodes(t *testing.T) {
	out, err := wsdrainCmd("count", "--target-port", "99999").CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 {
		t.Fatalf("bad port: err %v, want exit status 2; output %q", err, out)
	}
	out, err = wsdrainCmd("count", "--target-port", "1").Output()
	if runtime.GOOS != "linux" {
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(string(ee.Stderr), "wsdrain runs on Linux") {
			t.Fatalf("count on %s: err %v, want exit status 1 saying wsdrain runs on Linux", runtime.GOOS, err)
		}
		return
	}
	if err != nil {
		t.Fatalf("count: %v", err)
	}
	if strings.TrimSpace(string(out)) != "0" {
		t.Fatalf("count on an unused port printed %q, want 0", out)
	}
}

func TestParsePeer(t *testing.T) {
	tests := []struct {
		in, want, err string
	}{
		{in: "10.0.0.0/8", want: "10.0.0.0/8"},
		{in: "fd00::/8", want: "fd00::/8"},
		{in: "10.1.2.3", want: "10.1.2.3/32"},
		{in: "2001:db8::7", want: "2001:db8::7/128"},
		{in: "::ffff:10.0.0.0/104", want: "10.0.0.0/8"}, // the IPv4 network, written as IPv6
		{in: "10.1.2.3/8", err: "did you mean 10.0.0.0/8?"},
		{in: "fd00:10:244::/56", want: "fd00:10:244::/56"}, // a cluster's pod range
		{in: "0.0.0.0/0", err: "wider than /8"},
		{in: "0.0.0.0/1", err: "wider than /8"}, // with 128.0.0.0/1, all of IPv4
		{in: "128.0.0.0/1", err: "wider than /8"},
		{in: "10.0.0.0/7", err: "wider than /8"},
		{in: "::ffff:128.0.0.0/97", err: "wider than /8"},
		{in: "::/0", err: "holds every IPv4 client"},
		{in: "::ffff:0:0/96", err: "wider than /8"}, // every IPv4 client of a dual-stack app
		{in: "::/80", err: "holds every IPv4 client"},
		{in: "::fffe:0:0/95", err: "holds every IPv4 client"},
		{in: "::/96", want: "::/96"}, // IPv4-compatible, not mapped
		{in: "10.0.0.0/33", err: "want a network"},
		{in: "fe80::1%eth0", err: "want a network"},
		{in: "example.com", err: "want a network"},
		{in: "", err: "want a network"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := parsePeer(tt.in)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("parsePeer(%q) = %v, %v; want an error with %q", tt.in, got, err, tt.err)
				}
				return
			}
			if err != nil || got.String() != tt.want {
				t.Fatalf("parsePeer(%q) = %v, %v; want %s", tt.in, got, err, tt.want)
			}
		})
	}
}

// TestExclusionFlagsUsage: every mistake in the new flags is a one-line
// usage error (exit 2) that names the flag, in each mode that counts.
func TestExclusionFlagsUsage(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "fifo")
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"not a network", []string{"--ignore-peer", "scraper"}, `invalid value "scraper" for flag --ignore-peer`},
		{"host bits set", []string{"--ignore-peer", "10.1.2.3/8"}, "did you mean 10.0.0.0/8?"},
		{"everything", []string{"--ignore-peer", "0.0.0.0/0"}, "wider than /8"},
		{"half of IPv4", []string{"--ignore-peer", "0.0.0.0/1", "--ignore-peer", "128.0.0.0/1"}, "wider than /8"},
		{"every IPv4-mapped client", []string{"--ignore-peer", "::/80"}, "holds every IPv4 client"},
		{"idle below a second", []string{"--ignore-idle", "500ms"}, "want at least 1s"},
		{"idle from /proc", []string{"--ignore-idle", "30s", "--source", "proc"}, "--ignore-idle needs --source netlink or auto"},
		{"negative idle", []string{"--ignore-idle", "-1s"}, "must not be negative"},
	}
	for _, mode := range [][]string{{"count"}, {"stopper", "--fifo", fifo}, {"proxy", "--fifo", fifo}} {
		for _, tt := range tests {
			t.Run(mode[0]+"/"+tt.name, func(t *testing.T) {
				var stderr strings.Builder
				err := run(t.Context(), append(append([]string{}, mode...), tt.args...), &strings.Builder{}, &stderr)
				code := exitCode(err, &stderr)
				if code != 2 || !strings.Contains(stderr.String(), tt.want) || strings.Count(stderr.String(), "\n") != 1 {
					t.Fatalf("exit %d, stderr %q; want 2 and one line with %q", code, stderr.String(), tt.want)
				}
			})
		}
	}
}

func TestTooManyPeers(t *testing.T) {
	var l peerList
	for i := range maxPeers {
		if err := l.Set(netip.AddrFrom4([4]byte{10, 0, 0, byte(i)}).String()); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Set("10.0.1.0/24"); err == nil || !strings.Contains(err.Error(), "at most") {
		t.Fatalf("peer %d: %v; want an error", maxPeers+1, err)
	}
}

// TestModeHelp: -h and --help print a mode's synopsis, its example and every
// flag, spelled --flag, to stdout, and exit 0.
func TestModeHelp(t *testing.T) {
	callFlags := []string{"--target-port", "--source", "--ignore-peer", "--ignore-idle"}
	modes := map[string][]string{
		"proxy":   append([]string{"--listen", "--health-url", "--fifo", "--health-timeout", "--drain-start-wait"}, callFlags...),
		"stopper": append([]string{"--fifo", "--interval", "--min-drain", "--timeout", "--exit-wait", "--signal"}, callFlags...),
		"count":   callFlags,
	}
	for mode, flags := range modes {
		for _, h := range []string{"-h", "--help"} {
			t.Run(mode+"/"+h, func(t *testing.T) {
				var stdout, stderr bytes.Buffer
				code := exitCode(run(t.Context(), []string{mode, h}, &stdout, &stderr), &stderr)
				if code != 0 || stderr.Len() != 0 {
					t.Fatalf("exit %d, stderr %q; want 0 and nothing", code, stderr.String())
				}
				out := stdout.String()
				for _, want := range append([]string{"usage: wsdrain " + mode + " [flags]", "example:", "(default "}, flags...) {
					if !strings.Contains(out, want) {
						t.Errorf("help lacks %q:\n%s", want, out)
					}
				}
				for _, line := range strings.Split(out, "\n") {
					if strings.HasPrefix(line, "  -") && !strings.HasPrefix(line, "  --") {
						t.Errorf("a flag spelled with one dash: %q", line)
					}
				}
			})
		}
	}
}
