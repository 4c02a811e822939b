package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
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
