package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/gorilla/websocket"
)

// rollingUpdate: a call on pod A survives "kubectl rollout restart"; A turns
// unready at once, and is gone soon after the call ends.
func (r *run) rollingUpdate() error {
	pod, ip, logs, c, err := r.callOnAPod()
	if err != nil {
		return err
	}
	r.logf("call started to %s (%s)", pod, ip)
	time.Sleep(2 * time.Second)
	deleting, err := r.restartUntilDeleting(pod)
	if err != nil {
		return err
	}
	notServing, err := r.w.waitEvent("not-serving", pod, deleting.at, 30*time.Second)
	if err != nil {
		return err
	}
	d := notServing.at.Sub(deleting.at)
	r.check("old pod unready (EndpointSlice serving=false) ≤3s after its deletion", d <= 3*time.Second, "%s", ms(d))

	end := deleting.at.Add(10 * time.Second)
	time.Sleep(time.Until(end))
	ended := time.Now() // the client starts closing the call
	stats := c.end()
	r.logf("call ended by the client: %d sent, %d echoed", stats.sent, stats.echoed)
	gone, err := r.w.waitEvent("gone", pod, r.start, 60*time.Second)
	if err != nil {
		return err
	}
	d = gone.at.Sub(ended)
	r.check("old pod gone ≤3s after the call's end (aim: under 2s)", d <= 3*time.Second, "%s", ms(d))
	r.check("no echo lost", stats.err == nil && stats.sent == stats.echoed && stats.sent > 50, "%s", stats)
	if _, err := r.kubectl("rollout", "status", "deployment/voicebot", "--timeout=240s"); err != nil {
		return err
	}
	r.check("new pods ready after the rollout", len(r.w.readyPods()) == 2, "%d ready", len(r.w.readyPods()))
	wsdrainLog := logs.wait()
	r.preStops = append(r.preStops, preStopCheck{r.scenario, pod, wsdrainLog})
	r.signalFigures(wsdrainLog, ended, gone.at)
	return nil
}

// signalFigures splits "old pod gone after the call's end" in two: the
// stopper's part, the call's end to the app's SIGTERM (destroy events make it
// milliseconds; a 1s poll made it up to a second), and the kubelet's, the
// SIGTERM to the pod gone (stopping containers and sandbox: not ours). In a
// private PID namespace the stopper's part ends when it releases the app's
// preStop, which the kubelet's SIGTERM follows ("preStop hooks" measures it).
func (r *run) signalFigures(wsdrainLog string, ended, gone time.Time) {
	const name = "app SIGTERM (or release) ≤1s after the call's end (aim: under 0.1s)"
	signalled, ok := signalledAt(wsdrainLog)
	if !ok {
		r.check(name, false, "no \"signalled app\" line in the wsdrain log")
		return
	}
	d := signalled.Sub(ended)
	r.check(name, d <= time.Second, "%s", d.Round(100*time.Microsecond))
	r.check("old pod gone ≤3s after the app's SIGTERM (the kubelet's part)", gone.Sub(signalled) <= 3*time.Second, "%s", ms(gone.Sub(signalled)))
}

// idlePod: no calls; the pod is gone within --min-drain + 3s, and the
// proxy's probes to the app's health endpoint (on the call port) are not
// counted as calls.
func (r *run) idlePod() error {
	pod, _, err := r.pickPod()
	if err != nil {
		return err
	}
	logs := r.followLogs(pod)
	time.Sleep(2 * time.Second) // let readiness probes run through the proxy
	deleted := time.Now()
	if _, err := r.kubectl("delete", "pod", pod, "--wait=false"); err != nil {
		return err
	}
	r.logf("kubectl delete pod %s", pod)
	gone, err := r.w.waitEvent("gone", pod, r.start, 60*time.Second)
	if err != nil {
		return err
	}
	d := gone.at.Sub(deleted)
	r.check("idle pod gone ≤ --min-drain (5s) + 3s after the delete", d <= 8*time.Second, "%s", ms(d))
	out := logs.wait()
	r.logf("stopper: %s", firstLine(out, "no connections left"))
	r.check("health checks on the call port not counted (drain reached zero)",
		strings.Contains(out, `msg="no connections left"`) && !strings.Contains(out, "count=1"),
		"%s", field(firstLine(out, "no connections left"), "elapsed"))
	r.preStops = append(r.preStops, preStopCheck{r.scenario, pod, out})
	return r.waitReady(2)
}

// wrapper: the app runs under "sh -c", which does not pass SIGTERM on; the
// stopper must signal the server process itself.
func (r *run) wrapper() error {
	if err := r.deploy("app behind a shell wrapper", r.wrapped, false); err != nil {
		return err
	}
	p, err := r.callThenDelete("call open")
	if err != nil {
		return err
	}
	time.Sleep(7 * time.Second)
	ended := time.Now() // the client starts closing the call
	stats := p.call.end()
	r.logf("call ended by the client: %d sent, %d echoed", stats.sent, stats.echoed)
	gone, err := r.w.waitEvent("gone", p.name, r.start, 60*time.Second)
	if err != nil {
		return err
	}
	d := gone.at.Sub(ended)
	out := p.logs.wait()
	r.check("pod gone ≤3s after the call's end", d <= 3*time.Second, "%s", ms(d))
	r.logf("stopper: %s", firstLine(out, "signalled app"))
	r.check("the server process, not the shell, got SIGTERM",
		strings.Contains(out, "process=wsapp signal=SIGTERM"), "%s", field(firstLine(out, "signalled app"), "process"))
	r.check("no echo lost", stats.err == nil && stats.sent == stats.echoed, "%s", stats)
	r.preStops = append(r.preStops, preStopCheck{r.scenario, p.name, out})
	return nil
}

// restartUntilDeleting runs "kubectl rollout restart" and waits until the
// rollout deletes pod.
func (r *run) restartUntilDeleting(pod string) (event, error) {
	if _, err := r.kubectl("rollout", "restart", "deployment/voicebot"); err != nil {
		return event{}, err
	}
	r.logf("kubectl rollout restart deployment/voicebot")
	return r.w.waitEvent("deleting", pod, r.start, 5*time.Minute)
}

// callOnAPod starts a call through the Service and follows the wsdrain log
// of the pod that answered it. A call that reached a pod not ready (one the
// Service is still letting go of) is ended and made again.
func (r *run) callOnAPod() (pod, ip string, logs *logFollower, c *call, err error) {
	if err = r.waitReady(1); err != nil {
		return
	}
	for try := 0; try < 20; try++ {
		if c, err = startCall(r.service); err != nil {
			return
		}
		if ip = r.w.readyPods()[c.pod]; ip != "" {
			return c.pod, ip, r.followLogs(c.pod), c, nil
		}
		r.logf("call through %s reached %s, not ready: made again", r.service, c.pod)
		c.end()
		time.Sleep(200 * time.Millisecond)
	}
	return "", "", nil, nil, fmt.Errorf("20 calls through %s reached no ready pod", r.service)
}

// doomedPod is a pod deleted while a call to it is open.
type doomedPod struct {
	name    string
	call    *call
	logs    *logFollower
	deleted time.Time
}

// callThenDelete waits for two ready pods, starts a call to one and follows
// its wsdrain log, then deletes it.
func (r *run) callThenDelete(why string) (doomedPod, error) {
	if err := r.waitReady(2); err != nil {
		return doomedPod{}, err
	}
	pod, _, logs, c, err := r.callOnAPod()
	if err != nil {
		return doomedPod{}, err
	}
	deleted := time.Now()
	if _, err := r.kubectl("delete", "pod", pod, "--wait=false"); err != nil {
		return doomedPod{}, err
	}
	r.logf("kubectl delete pod %s (%s)", pod, why)
	return doomedPod{pod, c, logs, deleted}, nil
}

// timeout: a call outlives the stopper's --timeout; the app gets SIGTERM
// (exits by itself, not 137) before the grace period ends.
func (r *run) timeout() error {
	if err := r.deploy("timeout case: grace 40s, stopper --timeout 25s", r.appImage, true); err != nil {
		return err
	}
	p, err := r.callThenDelete("the call never ends by itself")
	if err != nil {
		return err
	}
	pod, c, logs, deleted := p.name, p.call, p.logs, p.deleted
	exited, err := r.waitAppExit(pod, 60*time.Second)
	if err != nil {
		return err
	}
	stats := c.wait()
	gone, err := r.w.waitEvent("gone", pod, r.start, 60*time.Second)
	if err != nil {
		return err
	}
	out := logs.wait()
	r.logf("app %s", exited.detail)
	r.check("app exited by SIGTERM (exit 0, not 137) before the 40s grace",
		strings.Contains(exited.detail, "exitCode=0") && exited.at.Sub(deleted) < 40*time.Second,
		"%s, %s", field(exited.detail, "exitCode"), ms(exited.at.Sub(deleted)))
	r.logf("stopper: %s", firstLine(out, "drain timeout"))
	r.check("kubectl logs -c wsdrain tells it",
		strings.Contains(out, "drain timeout") && strings.Contains(out, "connections=1") &&
			(strings.Contains(out, "signal=SIGTERM") || strings.Contains(out, "not signalling the app")),
		"%s", field(firstLine(out, "drain timeout"), "connections"))
	r.logf("call: %s", stats)
	r.check("the call was closed by the app (going away), not reset",
		websocket.IsCloseError(stats.err, websocket.CloseGoingAway), "close %s", closeCode(stats.err))
	r.check("pod gone before the grace period ends", gone.at.Sub(deleted) < 40*time.Second, "%s", ms(gone.at.Sub(deleted)))
	r.preStops = append(r.preStops, preStopCheck{r.scenario, pod, out})
	return nil
}

func (r *run) waitAppExit(pod string, timeout time.Duration) (event, error) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if e, ok := r.w.eventDetail("exited", pod, "container=app "); ok {
			return e, nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return event{}, fmt.Errorf("app container of %s did not exit within %v", pod, timeout)
}

func (r *run) waitReady(n int) error {
	for deadline := time.Now().Add(3 * time.Minute); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if len(r.w.readyPods()) >= n {
			return nil
		}
	}
	return fmt.Errorf("fewer than %d ready pods after 3 minutes", n)
}

// pickPod returns a ready pod, the first by name.
func (r *run) pickPod() (string, string, error) {
	if err := r.waitReady(1); err != nil {
		return "", "", err
	}
	pods := r.w.readyPods()
	names := make([]string, 0, len(pods))
	for n := range pods {
		names = append(names, n)
	}
	sort.Strings(names)
	return names[0], pods[names[0]], nil
}

// preStopCheck pairs a pod a scenario ended with its wsdrain log.
type preStopCheck struct {
	scenario, pod, logs string
}

var (
	kubeletHook = regexp.MustCompile(`^I(\d{4} \d{2}:\d{2}:\d{2}\.\d{6}).*"(Running preStop hook|PreStop hook completed)".*pod="default/([^"]+)".*containerName="([^"]+)"`)
	// The stopper's own SIGTERM (shared PID namespace), or its release of the
	// app's preStop, on which the kubelet sends it (private).
	appSignalled = regexp.MustCompile(`time=(\S+) level=INFO msg="(?:signalled app|not signalling the app[^"]*)"`)
)

// hooks reads, for every pod the other scenarios ended, the kubelet's hook
// lines: both preStop hooks start together at the start of termination (so
// the sidecar drains, native or not), and the app's hook completes when the
// stopper signals the app, not later.
func (r *run) hooks() error {
	hooks := r.kubeletHooks()
	for _, pc := range r.preStops {
		of := " (pod of " + strings.SplitN(pc.scenario, " ", 2)[0] + ")"
		fmt.Printf("  %s%s:\n", pc.pod, of)
		for _, line := range hooks.lines[pc.pod] {
			fmt.Println("  kubelet:", line)
		}
		appStart, ok1 := hooks.at[pc.pod+"/app/Running preStop hook"]
		sideStart, ok2 := hooks.at[pc.pod+"/wsdrain/Running preStop hook"]
		gap := sideStart.Sub(appStart).Abs()
		if !ok1 || !ok2 {
			r.check("both preStop hooks started within 1s"+of, false, "kubelet line found: app %v, wsdrain %v", ok1, ok2)
		} else {
			r.check("both preStop hooks started within 1s"+of, gap < time.Second, "%s apart", gap.Round(10*time.Microsecond))
		}

		signalled, _ := signalledAt(pc.logs)
		completed, ok := hooks.at[pc.pod+"/app/PreStop hook completed"]
		if !ok || signalled.IsZero() {
			r.check("app preStop completed ≤2s after the app's signal"+of, false,
				"kubelet line found %v, stopper signal found %v", ok, !signalled.IsZero())
			continue
		}
		d := completed.Sub(signalled)
		r.check("app preStop completed ≤2s after the app's signal"+of, d > -2*time.Second && d < 2*time.Second, "%s after", ms(d))
	}
	return nil
}

// signalledAt is when the stopper's log says it signalled the app.
func signalledAt(wsdrainLog string) (time.Time, bool) {
	var signalled time.Time
	for _, m := range appSignalled.FindAllStringSubmatch(wsdrainLog, -1) {
		signalled, _ = time.Parse(time.RFC3339Nano, m[1])
	}
	return signalled, !signalled.IsZero()
}

// kubeletHookLog is what the kubelet logged about preStop hooks.
type kubeletHookLog struct {
	at    map[string]time.Time // "pod/container/message": the last such line
	lines map[string][]string  // per pod, every hook line
}

func (r *run) kubeletHooks() kubeletHookLog {
	out := kubeletHookLog{at: map[string]time.Time{}, lines: map[string][]string{}}
	f, err := os.Open(r.kubeletLog)
	if err != nil {
		return out
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.Contains(strings.ToLower(line), "prestop hook") {
			continue
		}
		for _, pc := range r.preStops {
			if strings.Contains(line, pc.pod) {
				out.lines[pc.pod] = append(out.lines[pc.pod], shorten(line))
			}
		}
		if m := kubeletHook.FindStringSubmatch(line); m != nil {
			// klog's header has no year; the kubelet logs in the local zone.
			at, _ := time.ParseInLocation("2006 0102 15:04:05.000000", fmt.Sprintf("%d %s", time.Now().Year(), m[1]), time.Local)
			out.at[m[3]+"/"+m[4]+"/"+m[2]] = at
		}
	}
	return out
}

// logFollower collects "kubectl logs -f POD -c wsdrain" until it ends.
type logFollower struct {
	buf  *bytes.Buffer
	mu   *sync.Mutex
	done chan struct{}
	quit chan struct{} // closed by stop
	cmd  *exec.Cmd
}

func newLogFollower() *logFollower {
	return &logFollower{buf: &bytes.Buffer{}, mu: &sync.Mutex{}, done: make(chan struct{}), quit: make(chan struct{})}
}

func (r *run) followLogs(pod string) *logFollower {
	lf := newLogFollower()
	cmd := exec.Command(r.config.kubectl, "--kubeconfig", r.kubeconfig, "logs", "-f", pod, "-c", "wsdrain")
	lf.cmd = cmd
	cmd.Stdout = lockedWriter{lf}
	cmd.Stderr = lockedWriter{lf}
	if err := cmd.Start(); err != nil {
		close(lf.done)
		return lf
	}
	go func() { cmd.Wait(); close(lf.done) }()
	return lf
}

func (lf *logFollower) write(s string) {
	lf.mu.Lock()
	defer lf.mu.Unlock()
	lf.buf.WriteString(s)
}

// stop ends following, keeping what was read.
func (lf *logFollower) stop() {
	if lf.cmd != nil && lf.cmd.Process != nil {
		lf.cmd.Process.Kill()
	}
	close(lf.quit)
}

// sofar is what the log said until now.
func (lf *logFollower) sofar() string {
	lf.mu.Lock()
	defer lf.mu.Unlock()
	return lf.buf.String()
}

func (lf *logFollower) wait() string {
	out := lf.read()
	fmt.Print(indent("  wsdrain log: ", out))
	return out
}

// read returns the log once it has ended, without printing it.
func (lf *logFollower) read() string {
	select {
	case <-lf.done:
	case <-time.After(90 * time.Second):
	}
	lf.mu.Lock()
	defer lf.mu.Unlock()
	return lf.buf.String()
}

type lockedWriter struct{ lf *logFollower }

func (w lockedWriter) Write(p []byte) (int, error) {
	w.lf.mu.Lock()
	defer w.lf.mu.Unlock()
	return w.lf.buf.Write(p)
}

func (r *run) kubectl(args ...string) (string, error) {
	out, err := exec.Command(r.config.kubectl, append([]string{"--kubeconfig", r.kubeconfig}, args...)...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// call is a WebSocket call that sends a message every 100ms and checks
// that each one is echoed.
type call struct {
	conn      *websocket.Conn
	pod       string    // the pod that answered the handshake
	connected time.Time // when it did
	stop      chan struct{}
	done      chan callStats
}

type callStats struct {
	sent, echoed int
	maxGap       time.Duration // the longest time without an echo, from the handshake on
	maxGapEnd    time.Time     // when it ended
	err          error
}

var dialer = websocket.Dialer{HandshakeTimeout: 5 * time.Second}

// startCall makes a call to addr (the Service's ClusterIP:port).
func startCall(addr string) (*call, error) {
	conn, resp, err := dialer.Dial("ws://"+addr+"/ws", nil)
	if err != nil {
		return nil, fmt.Errorf("call to %s: %w", addr, err)
	}
	c := &call{conn: conn, pod: resp.Header.Get("X-Pod"), connected: time.Now(),
		stop: make(chan struct{}), done: make(chan callStats, 1)}
	go c.loop()
	return c, nil
}

func (c *call) loop() {
	var s callStats
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	last := c.connected
	defer func() {
		s.noteGap(last)
		c.conn.Close()
		c.done <- s
	}()
	for {
		select {
		case <-c.stop:
			c.conn.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, "call over"), time.Now().Add(time.Second))
			return
		case <-tick.C:
		}
		msg := fmt.Sprintf("frame %d", s.sent)
		if s.err = c.conn.WriteMessage(websocket.TextMessage, []byte(msg)); s.err != nil {
			return
		}
		s.sent++
		c.conn.SetReadDeadline(time.Now().Add(3 * time.Second))
		_, got, err := c.conn.ReadMessage()
		if err != nil {
			s.err = err
			return
		}
		if string(got) == msg {
			s.echoed++
			s.noteGap(last)
			last = time.Now()
		}
	}
}

// noteGap keeps the time since last if it is the longest gap yet.
func (s *callStats) noteGap(last time.Time) {
	if gap := time.Since(last); gap > s.maxGap {
		s.maxGap, s.maxGapEnd = gap, time.Now()
	}
}

// end closes the call normally and returns its figures.
func (c *call) end() callStats {
	close(c.stop)
	return <-c.done
}

// wait returns the figures once the server has ended the call.
func (c *call) wait() callStats {
	select {
	case s := <-c.done:
		return s
	case <-time.After(60 * time.Second):
		return c.end()
	}
}

func ms(d time.Duration) string { return d.Round(time.Millisecond).String() }

func (s callStats) String() string {
	if s.err != nil {
		return fmt.Sprintf("%d/%d echoed, then %v", s.echoed, s.sent, s.err)
	}
	return fmt.Sprintf("%d/%d echoed", s.echoed, s.sent)
}

// field returns "key=value" from a logfmt line, or "(no key)".
func field(line, key string) string {
	for _, f := range strings.Fields(line) {
		if strings.HasPrefix(f, key+"=") {
			return f
		}
	}
	return "(no " + key + ")"
}

// closeCode returns the WebSocket close code of err, or err itself.
func closeCode(err error) string {
	if ce, ok := err.(*websocket.CloseError); ok {
		return fmt.Sprint(ce.Code)
	}
	return fmt.Sprint(err)
}

func firstLine(text, containing string) string {
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, containing) {
			return l
		}
	}
	return "(no line with " + containing + ")"
}

func indent(prefix, text string) string {
	var b strings.Builder
	for _, l := range strings.Split(strings.TrimRight(text, "\n"), "\n") {
		b.WriteString(prefix + l + "\n")
	}
	return b.String()
}

func shorten(s string) string {
	if len(s) > 220 {
		return s[:220] + "…"
	}
	return s
}
