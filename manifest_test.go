package main

// The shipped manifests, as users copy them: what the stopper and the
// kubelet rely on must hold in each.

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// shippedManifests reads every k8s*.yaml at the repository root.
func shippedManifests(t *testing.T) map[string]string {
	t.Helper()
	names, _ := filepath.Glob("k8s*.yaml")
	if len(names) == 0 {
		t.Fatal("no k8s*.yaml manifest at the repository root")
	}
	out := map[string]string{}
	for _, m := range names {
		b, err := os.ReadFile(m)
		if err != nil {
			t.Fatal(err)
		}
		out[m] = string(b)
	}
	return out
}

// TestManifestShapes: the default manifest keeps the sidecar out of the
// app's PID namespace and under its own UID; the shared-PID one shares both,
// or the stopper could not see or signal the app. Both run wsdrain as a
// native sidecar, so its proxy outlives the app's preStop.
func TestManifestShapes(t *testing.T) {
	ms := shippedManifests(t)
	shapes := map[string]struct {
		sharedPID  bool
		sidecarUID string
	}{"k8s.yaml": {false, "65532"}, "k8s-shared-pid.yaml": {true, "10001"}}
	uid := regexp.MustCompile(`(?m)^ {12}runAsUser: (\d+)`)
	for name, want := range shapes {
		text, ok := ms[name]
		if !ok {
			t.Errorf("%s is not shipped", name)
			continue
		}
		if got := strings.Contains(text, "\n      shareProcessNamespace: true\n"); got != want.sharedPID {
			t.Errorf("%s: shareProcessNamespace %v, want %v", name, got, want.sharedPID)
		}
		_, pod, ok := strings.Cut(text, "      initContainers:")
		sidecar, app, ok2 := strings.Cut(pod, "      containers:")
		if !ok || !ok2 || !strings.Contains(sidecar, "- name: wsdrain") || !strings.Contains(sidecar, "restartPolicy: Always") {
			t.Errorf("%s: wsdrain is not a native sidecar (initContainers, restartPolicy: Always)", name)
			continue
		}
		su, au := uid.FindStringSubmatch(sidecar), uid.FindStringSubmatch(app)
		if su == nil || au == nil || su[1] != want.sidecarUID || (want.sharedPID && su[1] != au[1]) {
			t.Errorf("%s: sidecar runAsUser %v, app runAsUser %v; want the sidecar as %s", name, su, au, want.sidecarUID)
		}
	}
}

// TestManifestsKeepOtherPodsOffTheProxy reads every shipped manifest: each
// must admit other pods to the app's call port and to nothing else, so that
// the proxy's port is left to the node (the kubelet).
func TestManifestsKeepOtherPodsOffTheProxy(t *testing.T) {
	for m, text := range shippedManifests(t) {
		var policy string
		for _, doc := range strings.Split(text, "\n---\n") {
			if strings.Contains(doc, "\nkind: NetworkPolicy\n") {
				policy = doc
			}
		}
		if policy == "" {
			t.Errorf("%s ships no NetworkPolicy: every pod can reach the proxy's port", m)
			continue
		}
		if !strings.Contains(policy, `policyTypes: ["Ingress"]`) {
			t.Errorf("%s: the NetworkPolicy does not restrict ingress", m)
		}
		var ports []string
		for _, p := range regexp.MustCompile(`(?m)^\s*-?\s*port:\s*(\S+)`).FindAllStringSubmatch(policy, -1) {
			ports = append(ports, p[1])
		}
		if len(ports) != 1 || ports[0] != "calls" {
			t.Errorf("%s: the NetworkPolicy admits ports %v; want the call port only", m, ports)
		}
		// A rule without ports admits every port: each rule must name its ports.
		_, ingress, _ := strings.Cut(policy, "\n  ingress:\n")
		for i, rule := range regexp.MustCompile(`(?m)^    - `).Split(ingress, -1)[1:] {
			if !strings.Contains(rule, "ports:") {
				t.Errorf("%s: ingress rule %d of the NetworkPolicy names no ports, so admits them all:\n%s", m, i+1, rule)
			}
		}
		// It must select the pods that the manifest runs.
		_, template, _ := strings.Cut(text, "\n  template:\n")
		if got, want := yamlBlock(policy, "  podSelector:\n    matchLabels:\n"), yamlBlock(template, "    metadata:\n      labels:\n"); got == "" || got != want {
			t.Errorf("%s: the NetworkPolicy selects %q, the pods are labelled %q", m, got, want)
		}
	}
}

// yamlBlock returns the "key: value" lines after head that are indented
// deeper than head's last line, comments dropped, as one string.
func yamlBlock(doc, head string) string {
	_, rest, ok := strings.Cut(doc, head)
	if !ok {
		return ""
	}
	lines := strings.Split(strings.TrimSuffix(head, "\n"), "\n")
	indent := len(lines[len(lines)-1]) - len(strings.TrimLeft(lines[len(lines)-1], " "))
	var kv []string
	for _, line := range strings.Split(rest, "\n") {
		if len(line)-len(strings.TrimLeft(line, " ")) <= indent || strings.TrimSpace(line) == "" {
			break
		}
		line, _, _ = strings.Cut(line, "#")
		kv = append(kv, strings.Join(strings.Fields(line), " "))
	}
	return strings.Join(kv, ", ")
}
