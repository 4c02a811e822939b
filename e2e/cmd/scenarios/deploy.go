package main

// deploy.go applies a shipped manifest with as few changes as the test
// cluster needs, each printed, and removes it again.

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// deploy applies r.manifest with only image names, pull policy, (for the
// timeout and scraper scenarios) a shorter grace period and the extra edits
// changed, each change printed. An edit changes every place it matches.
func (r *run) deploy(why, appImage string, shortGrace bool, extra ...[2]string) error {
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
	edits = append(edits, extra...)
	name := filepath.Base(r.manifest)
	r.logf("apply %s (%s) with these changes:", name, why)
	for _, e := range edits {
		if !strings.Contains(text, e[0]) {
			return fmt.Errorf("%s no longer contains %q", name, e[0])
		}
		n := strings.Count(text, e[0])
		text = strings.ReplaceAll(text, e[0], e[1])
		fmt.Printf("             - %q -> %q (%d×)\n", e[0], e[1], n)
	}
	text, n := addPullPolicyNever(text)
	fmt.Printf("             - imagePullPolicy: Never on %d containers (no registry here)\n", n)
	if err := os.WriteFile(r.rendered(), []byte(text), 0o644); err != nil {
		return err
	}
	if _, err := r.kubectl("apply", "--validate=strict", "-f", r.rendered()); err != nil {
		return err
	}
	if _, err := r.kubectl("rollout", "status", "deployment/voicebot", "--timeout=240s"); err != nil {
		return err
	}
	r.logf("deployment rolled out")
	if err := r.serviceAnswers(); err != nil {
		return err
	}
	if strings.Contains(why, "shipped") {
		r.check("admitted under the restricted Pod Security profile", len(r.w.readyPods()) == 2, "%d pods ready", len(r.w.readyPods()))
		r.runtimeChecks()
	}
	return nil
}

// serviceAnswers finds the Service's ClusterIP and waits until kube-proxy
// routes a call through it.
func (r *run) serviceAnswers() error {
	out, err := r.kubectl("get", "service", "voicebot", "-o", "jsonpath={.spec.clusterIP}:{.spec.ports[0].port}")
	if err != nil {
		return err
	}
	r.service = strings.TrimSpace(out)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		c, err := startCall(r.service)
		if err == nil {
			c.end()
			r.logf("calls go through the Service voicebot, ClusterIP %s (kube-proxy)", r.service)
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no call through the Service after 30s: %w", err)
		}
	}
}

// runtimeChecks shows which runtime runs the pods, and that the restricted
// profile's seccompProfile RuntimeDefault is really applied to the app.
func (r *run) runtimeChecks() {
	out, err := r.kubectl("get", "node", "-o", "jsonpath={.items[0].status.nodeInfo.containerRuntimeVersion}")
	r.check("container runtime", err == nil && strings.HasPrefix(out, "containerd://2."), "%s, %s%v", out, r.runtime, errOrNil(err))
	pod, _, err := r.pickPod()
	if err != nil {
		r.check("app runs under seccomp (Seccomp: 2)", false, "%v", err)
		return
	}
	pid, err := r.containerPID(pod, "app")
	if err != nil {
		r.check("app runs under seccomp (Seccomp: 2)", false, "%v", err)
		return
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	line := firstLine(string(status), "Seccomp:")
	r.logf("%s app (host PID %d) /proc/1/status: %s", pod, pid, line)
	r.check("app runs under seccomp (Seccomp: 2)", err == nil && strings.Fields(line + " x")[1] == "2", "%s", line)
}

// sharesPIDNamespace tells whether a manifest's pods share their PID namespace.
func sharesPIDNamespace(manifest string) (bool, error) {
	b, err := os.ReadFile(manifest)
	return strings.Contains(string(b), "\n      shareProcessNamespace: true\n"), err
}

// rendered is where the manifest as applied is written.
func (r *run) rendered() string {
	return filepath.Join(r.workDir, strings.TrimSuffix(filepath.Base(r.manifest), ".yaml")+".rendered.yaml")
}

// undeploy deletes what the manifest created and waits until its pods are
// gone, so that the next manifest starts on an empty namespace.
func (r *run) undeploy() error {
	r.logf("delete everything %s created", filepath.Base(r.manifest))
	if _, err := r.kubectl("delete", "--wait=true", "--timeout=120s", "-f", r.rendered()); err != nil {
		return err
	}
	return r.w.waitNoPods(2 * time.Minute)
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
