// Scenarios drives the shipped k8s.yaml on the real cluster that e2e/run.sh
// has started, and prints a timeline and one PASS/FAIL line per check with
// the figure it measured. It exits 1 when any check fails.
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"
	"time"
)

type config struct {
	kubectl, kubeconfig, apiURL, token string
	manifest, workDir, kubeletLog      string
	wsdrainImage, appImage, wrapped    string
}

func main() {
	var c config
	flag.StringVar(&c.kubectl, "kubectl", "kubectl", "kubectl binary")
	flag.StringVar(&c.kubeconfig, "kubeconfig", "", "kubeconfig of the e2e cluster")
	flag.StringVar(&c.apiURL, "api", "https://127.0.0.1:16443", "API server URL, for watches")
	flag.StringVar(&c.token, "token", "", "bearer token for the API server")
	flag.StringVar(&c.manifest, "manifest", "k8s.yaml", "the shipped manifest")
	flag.StringVar(&c.workDir, "work", os.TempDir(), "where to write rendered manifests")
	flag.StringVar(&c.kubeletLog, "kubelet-log", "", "the kubelet's log file (run with -v=3)")
	flag.StringVar(&c.wsdrainImage, "wsdrain-image", "", "wsdrain image, built from the Dockerfile")
	flag.StringVar(&c.appImage, "app-image", "", "demo WebSocket app image")
	flag.StringVar(&c.wrapped, "wrapped-app-image", "", "demo app started through a shell wrapper")
	flag.Parse()

	r := newRun(c)
	err := r.all()
	r.summary()
	if err != nil {
		fmt.Printf("FAIL: %v\n", err)
		os.Exit(1)
	}
	if r.failed > 0 {
		os.Exit(1)
	}
}

// run holds what the scenarios share: the cluster, the timeline and results.
type run struct {
	config
	start          time.Time
	w              *watcher
	passed, failed int
	preStops       []preStopCheck
}

func newRun(c config) *run { return &run{config: c, start: time.Now()} }

// logf prints one timeline line.
func (r *run) logf(format string, args ...any) {
	fmt.Printf("[%8.3fs] %s\n", time.Since(r.start).Seconds(), fmt.Sprintf(format, args...))
}

// check prints a PASS or FAIL line with the measured figure.
func (r *run) check(name string, ok bool, figure string, args ...any) {
	verdict := "PASS"
	if ok {
		r.passed++
	} else {
		verdict = "FAIL"
		r.failed++
	}
	fmt.Printf("%s  %s: %s\n", verdict, name, fmt.Sprintf(figure, args...))
}

func (r *run) summary() {
	fmt.Printf("\n%d passed, %d failed\n", r.passed, r.failed)
	fmt.Printf("total wall time of the scenarios: %s\n", time.Since(r.start).Round(time.Millisecond))
}

func (r *run) all() error {
	w, err := startWatcher(r.apiURL, r.token, r.logf)
	if err != nil {
		return err
	}
	r.w = w
	// Pods that break the "restricted" profile are then refused outright.
	if _, err := r.kubectl("label", "namespace", "default", "--overwrite",
		"pod-security.kubernetes.io/enforce=restricted", "pod-security.kubernetes.io/enforce-version=latest"); err != nil {
		return err
	}
	r.logf("namespace default enforces the restricted Pod Security profile")
	if err := r.deploy("shipped manifest", r.appImage, false); err != nil {
		return err
	}
	steps := []struct {
		name string
		fn   func() error
	}{
		{"1. rolling update under a call", r.rollingUpdate},
		{"3+4. idle pod, health on the call port", r.idlePod},
		{"5. wrapper process", r.wrapper},
		{"2. call longer than the drain timeout", r.timeout},
	}
	for _, s := range steps {
		fmt.Printf("\n== scenario %s\n", s.name)
		if err := s.fn(); err != nil {
			r.check("scenario "+s.name, false, "%v", err)
		}
	}
	fmt.Printf("\n== scenario 6. no lingering hooks\n")
	r.checkPreStops()
	return nil
}

// deploy applies k8s.yaml with only image names, pull policy and (for the
// timeout scenario) a shorter grace period changed, each change printed.
func (r *run) deploy(why, appImage string, shortGrace bool) error {
	b, err := os.ReadFile(r.manifest)
	if err != nil {
		return err
	}
	text := string(b)
	edits := [][2]string{
		{"image: registry.example.com/voicebot:1.0", "image: " + appImage},
		{"image: wsdrain:dev", "image: " + r.wsdrainImage},
	}
	if shortGrace {
		edits = append(edits,
			[2]string{"terminationGracePeriodSeconds: 600", "terminationGracePeriodSeconds: 40"},
			[2]string{"--timeout=570s", "--timeout=25s"})
	}
	r.logf("apply k8s.yaml (%s) with these changes:", why)
	for _, e := range edits {
		if !strings.Contains(text, e[0]) {
			return fmt.Errorf("k8s.yaml no longer contains %q", e[0])
		}
		text = strings.Replace(text, e[0], e[1], 1)
		fmt.Printf("             - %q -> %q\n", e[0], e[1])
	}
	text, n := addPullPolicyNever(text)
	fmt.Printf("             - imagePullPolicy: Never on %d containers (no registry here)\n", n)
	path := r.workDir + "/k8s.rendered.yaml"
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		return err
	}
	if _, err := r.kubectl("apply", "--validate=strict", "-f", path); err != nil {
		return err
	}
	if _, err := r.kubectl("rollout", "status", "deployment/voicebot", "--timeout=240s"); err != nil {
		return err
	}
	r.logf("deployment rolled out")
	if strings.Contains(why, "shipped") {
		r.check("k8s.yaml admitted under the restricted Pod Security profile", len(r.w.readyPods()) == 2, "%d pods ready", len(r.w.readyPods()))
	}
	return nil
}

// addPullPolicyNever adds imagePullPolicy: Never under every image line.
func addPullPolicyNever(text string) (string, int) {
	lines := strings.Split(text, "\n")
	var out []string
	n := 0
	for _, l := range lines {
		out = append(out, l)
		if trimmed := strings.TrimLeft(l, " "); strings.HasPrefix(trimmed, "image: ") {
			indent := l[:len(l)-len(trimmed)]
			out = append(out, indent+"imagePullPolicy: Never")
			n++
		}
	}
	return strings.Join(out, "\n"), n
}
