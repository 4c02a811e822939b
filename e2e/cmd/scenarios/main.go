// Scenarios drives the shipped manifests on the real cluster that e2e/run.sh
// has started, and prints a timeline and one PASS/FAIL line per check with
// the figure it measured. It exits 1 when any check fails.
//
// Each run adds its checks as rows (label, manifest, scenario, check, verdict,
// figure) to the -results file; "scenarios -summary FILE" prints them as one
// table, a column per label (Kubernetes version) and manifest.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

type config struct {
	kubectl, kubeconfig, apiURL, token string
	manifests                          []string
	workDir, kubeletLog                string
	wsdrainImage, appImage, wrapped    string
	scraperIP                          string
	label, resultsFile                 string
	only, skip                         *regexp.Regexp
	pidDir, podLogs, ctr, runtime      string
}

func main() {
	var c config
	var manifests, only, skip, summary string
	flag.StringVar(&c.kubectl, "kubectl", "kubectl", "kubectl binary")
	flag.StringVar(&c.kubeconfig, "kubeconfig", "", "kubeconfig of the e2e cluster")
	flag.StringVar(&c.apiURL, "api", "https://127.0.0.1:16443", "API server URL, for watches")
	flag.StringVar(&c.token, "token", "", "bearer token for the API server")
	flag.StringVar(&manifests, "manifest", "k8s.yaml", "the shipped manifests, comma-separated; every scenario runs on each")
	flag.StringVar(&c.workDir, "work", os.TempDir(), "where to write rendered manifests")
	flag.StringVar(&c.kubeletLog, "kubelet-log", "", "the kubelet's log file (run with -v=3)")
	flag.StringVar(&c.wsdrainImage, "wsdrain-image", "", "wsdrain image, built from the Dockerfile")
	flag.StringVar(&c.appImage, "app-image", "", "demo WebSocket app image")
	flag.StringVar(&c.wrapped, "wrapped-app-image", "", "demo app started through a shell wrapper")
	flag.StringVar(&c.scraperIP, "scraper-ip", "", "a local address, not the calls', for the keep-alive scraper to connect from")
	flag.StringVar(&c.label, "label", "", "what this run is, for the summary: the Kubernetes version")
	flag.StringVar(&c.resultsFile, "results", "", "append one row per check to this file")
	flag.StringVar(&only, "run", ".", "run only the scenarios whose name matches this regexp")
	flag.StringVar(&skip, "skip", "^$", "do not run the scenarios whose name matches this regexp")
	flag.StringVar(&c.pidDir, "pids", "", "e2e/run.sh's NAME.pid and NAME.sh of the cluster's processes, for the faults")
	flag.StringVar(&c.podLogs, "pod-logs", "", "the kubelet's podLogsDir, read where a kubelet restart ends \"kubectl logs -f\"")
	flag.StringVar(&c.ctr, "containerd", "ctr -n k8s.io", "ctr command line for the node's containerd")
	flag.StringVar(&c.runtime, "runtime", "", "the OCI runtime's name and version, for the summary")
	flag.StringVar(&summary, "summary", "", "print the rows of this results file as a table, and exit")
	flag.Parse()

	if summary != "" {
		if err := printSummary(summary, os.Stdout); err != nil {
			fmt.Fprintf(os.Stderr, "summary: %v\n", err)
			os.Exit(1)
		}
		return
	}
	var err error
	if c.only, err = regexp.Compile(only); err != nil {
		fmt.Fprintf(os.Stderr, "-run: %v\n", err)
		os.Exit(2)
	}
	if c.skip, err = regexp.Compile(skip); err != nil {
		fmt.Fprintf(os.Stderr, "-skip: %v\n", err)
		os.Exit(2)
	}
	c.manifests = strings.Split(manifests, ",")
	r := newRun(c)
	err = r.all()
	r.summary()
	if werr := r.writeResults(); werr != nil {
		fmt.Printf("FAIL: results: %v\n", werr)
		os.Exit(1)
	}
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
	manifest       string // the manifest the scenarios run on now
	service        string // the Service's ClusterIP:port, where every call goes
	scenario       string // the scenario running now, for the summary rows
	start          time.Time
	w              *watcher
	passed, failed int
	rows           []row
	preStops       []preStopCheck
}

func newRun(c config) *run { return &run{config: c, start: time.Now()} }

// logf prints one timeline line.
func (r *run) logf(format string, args ...any) {
	fmt.Printf("[%8.3fs] %s\n", time.Since(r.start).Seconds(), fmt.Sprintf(format, args...))
}

// check prints a PASS or FAIL line with the measured figure, and keeps it
// for the summary table: keep the figure short.
func (r *run) check(name string, ok bool, figure string, args ...any) {
	verdict := "PASS"
	if ok {
		r.passed++
	} else {
		verdict = "FAIL"
		r.failed++
	}
	r.row(verdict, name, fmt.Sprintf(figure, args...))
}

// info prints and keeps a figure that informs and does not fail the run.
func (r *run) info(name, figure string, args ...any) {
	r.row("INFO", name, fmt.Sprintf(figure, args...))
}

func (r *run) row(verdict, name, fig string) {
	fmt.Printf("%s  %s: %s\n", verdict, name, fig)
	r.rows = append(r.rows, row{r.label, filepath.Base(r.manifest), r.scenario, name, verdict, fig})
}

func (r *run) summary() {
	fmt.Printf("\n%s: %d passed, %d failed\n", r.label, r.passed, r.failed)
	fmt.Printf("total wall time of the scenarios: %s\n", time.Since(r.start).Round(time.Millisecond))
}

// scenario is one entry of the table below; fn returns an error when the
// scenario could not go on (its checks so far stay recorded). A sharedPID
// scenario runs only on a manifest that shares the pod's PID namespace.
type scenario struct {
	name      string
	fn        func(*run) error
	sharedPID bool
}

// scenarios run in this order on each manifest, once it is deployed as
// shipped. Add a new one here; "hooks" reads the pods the others ended.
var scenarios = []scenario{
	{"1. rolling update under a call", (*run).rollingUpdate, false},
	{"2. idle pod, health on the call port", (*run).idlePod, false},
	// Only the stopper can get past a wrapper that swallows the kubelet's
	// SIGTERM, and only where it sees the app's processes.
	{"3. app behind a shell wrapper", (*run).wrapper, true},
	{"4. call longer than the drain timeout", (*run).timeout, false},
	{"5. keep-alive scraper on the call port", (*run).scraper, false},
	{"6. preStop hooks", (*run).hooks, false},
	{"7. rolling update under load", (*run).underLoad, false},
	{"8. kubelet killed mid-drain", (*run).kubeletKilled, false},
	{"9. containerd killed mid-drain", (*run).containerdKilled, false},
	{"10. app crashes mid-drain", (*run).appCrashes, false},
	{"11. proxy killed mid-drain (informs)", (*run).proxyKilled, false},
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
	for _, m := range r.manifests {
		if err := r.onManifest(m); err != nil {
			return err
		}
	}
	return nil
}

// onManifest deploys one manifest as shipped, runs every scenario on it and
// deletes what it deployed.
func (r *run) onManifest(manifest string) error {
	r.manifest, r.preStops = manifest, nil
	r.scenario = "0. deploy"
	fmt.Printf("\n== %s %s: deploy as shipped\n", r.label, filepath.Base(manifest))
	if err := r.deploy("shipped manifest", r.appImage, false); err != nil {
		r.check("deployed as shipped", false, "%v", err)
		return err
	}
	shared, err := sharesPIDNamespace(manifest)
	if err != nil {
		return err
	}
	for _, s := range scenarios {
		if !r.only.MatchString(s.name) || r.skip.MatchString(s.name) {
			continue
		}
		if s.sharedPID && !shared {
			fmt.Printf("\n== %s %s: scenario %s: not run, the manifest does not share the PID namespace\n", r.label, filepath.Base(manifest), s.name)
			continue
		}
		r.scenario = s.name
		fmt.Printf("\n== %s %s: scenario %s\n", r.label, filepath.Base(manifest), s.name)
		if err := s.fn(r); err != nil {
			r.check("ran to its end", false, "%v", err)
		}
	}
	return r.undeploy()
}
