package main

// faults.go: faults injected in the middle of a drain. Each scenario holds
// one call through the Service, deletes the pod that answered it, and
// injects its fault faultAfter into the drain, while the call is open.

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const (
	faultAfter   = 4 * time.Second  // from the delete to the fault
	restartAfter = 2 * time.Second  // from the kill to the start again
	faultCall    = 14 * time.Second // from the delete to the call's planned end
)

// kubeletKilled: the kubelet is killed and started again mid-drain; it runs
// both preStop hooks again, and the call lasts to its end.
func (r *run) kubeletKilled() error {
	return r.restartMidDrain("kubelet")
}

// containerdKilled: containerd is killed and started again mid-drain (the
// shims, the app and the exec'd stopper keep running).
func (r *run) containerdKilled() error {
	return r.restartMidDrain("containerd")
}

func (r *run) restartMidDrain(component string) error {
	p, err := r.faultCallThenDelete()
	if err != nil {
		return err
	}
	time.Sleep(time.Until(p.deleted.Add(faultAfter)))
	killed, err := r.killAndRestart(component)
	if err != nil {
		return err
	}
	r.logf("%s killed (SIGKILL) %s into the drain, started again %s later", component, ms(killed.Sub(p.deleted)), restartAfter)
	end := p.deleted.Add(faultCall)
	if component == "containerd" {
		// The kubelet cannot stop the app while containerd is away: kubelet
		// 1.37 then never lets the native sidecar's turn come, and the pod
		// waits out its grace period (README "Warnings and limits"). So the
		// call ends only once containerd answers again and the kubelet's
		// reconnect backoff (at most 3s) has passed.
		back, err := r.waitContainerd(killed.Add(restartAfter))
		if err != nil {
			return err
		}
		r.info("containerd answering again after its start", "%s", ms(back.Sub(killed.Add(restartAfter))))
		if b := back.Add(4 * time.Second); b.After(end) {
			end = b
		}
	}
	time.Sleep(time.Until(end))
	ended := time.Now()
	stats := p.call.end()
	r.logf("call ended by the client: %s, longest gap between echoes %s, ending %s after the %s's kill",
		stats, ms(stats.maxGap), ms(stats.maxGapEnd.Sub(killed)), component)
	gone, err := r.w.waitEvent("gone", p.name, r.start, 90*time.Second)
	if err != nil {
		return err
	}
	out := p.logs.wait()
	r.check("call lasted to its planned end, no gap in echoes over 1s",
		stats.err == nil && stats.sent == stats.echoed && stats.maxGap <= time.Second, "gap %s, %s", ms(stats.maxGap), stats)
	if signalled, ok := signalledAt(out); ok {
		r.check("app SIGTERM (or release) ≤1s after the call's end", signalled.Sub(ended) <= time.Second, "%s", ms(signalled.Sub(ended)))
	} else {
		r.check("app SIGTERM (or release) ≤1s after the call's end", false, "not in the wsdrain log")
	}
	r.check("pod gone ≤3s after the call's end", gone.at.Sub(ended) <= goneBound, "%s", ms(gone.at.Sub(ended)))
	r.info("stopper runs seen in the wsdrain log", "%d", strings.Count(out, `msg="stopper started"`))
	return r.waitReady(2)
}

// appCrashes: the app is killed with the call open. The call is lost to the
// fault; the stopper sees no connection left, releases the app's preStop, and
// the pod goes at once, not at the end of the grace period.
func (r *run) appCrashes() error {
	p, err := r.faultCallThenDelete()
	if err != nil {
		return err
	}
	time.Sleep(time.Until(p.deleted.Add(faultAfter)))
	crashed, err := r.killContainer(p.name, "app")
	if err != nil {
		return err
	}
	r.logf("app of %s killed (SIGKILL) %s into the drain", p.name, ms(crashed.Sub(p.deleted)))
	stats := p.call.wait()
	r.logf("call: %s", stats)
	gone, err := r.w.waitEvent("gone", p.name, r.start, 90*time.Second)
	if err != nil {
		return err
	}
	out := p.logs.wait()
	r.check("pod gone ≤10s after the app's crash", gone.at.Sub(crashed) <= 10*time.Second, "%s", ms(gone.at.Sub(crashed)))
	saw := firstLine(out, `msg="no connections left"`)
	r.logf("stopper: %s", saw)
	r.check("the wsdrain log tells it", strings.Contains(out, `msg="no connections left"`) &&
		strings.Contains(out, "app preStop released"), "no connections left, %s", field(saw, "elapsed"))
	r.info("stopper runs seen in the wsdrain log", "%d", strings.Count(out, `msg="stopper started"`))
	return r.waitReady(2)
}

// proxyKilled: the wsdrain proxy is killed mid-drain. The app's httpGet
// preStop then fails and the kubelet stops the app: the call is cut. This
// measures what happens; it does not fail the run.
func (r *run) proxyKilled() error {
	p, err := r.faultCallThenDelete()
	if err != nil {
		return err
	}
	time.Sleep(time.Until(p.deleted.Add(faultAfter)))
	killed, err := r.killContainer(p.name, "wsdrain")
	if err != nil {
		return err
	}
	r.logf("wsdrain proxy of %s killed (SIGKILL) %s into the drain", p.name, ms(killed.Sub(p.deleted)))
	var stats callStats
	var ended time.Time
	select {
	case stats = <-p.call.done:
		ended = time.Now()
	case <-time.After(time.Until(p.deleted.Add(faultCall))):
		ended = time.Now()
		stats = p.call.end()
	}
	r.logf("call: %s", stats)
	gone, err := r.w.waitEvent("gone", p.name, r.start, 90*time.Second)
	if err != nil {
		return err
	}
	p.logs.wait()
	if stats.err != nil {
		r.info("the call", "cut %s after the kill (close %s)", ms(ended.Sub(killed)), closeCode(stats.err))
	} else {
		r.info("the call", "lasted to its planned end, gap %s", ms(stats.maxGap))
	}
	r.info("pod gone after the kill", "%s", ms(gone.at.Sub(killed)))
	return r.waitReady(2)
}

// faultCallThenDelete starts a call through the Service, follows the
// wsdrain log of the pod that answered from the node's log file, and deletes
// that pod.
func (r *run) faultCallThenDelete() (doomedPod, error) {
	if err := r.waitReady(2); err != nil {
		return doomedPod{}, err
	}
	pod, _, logs, c, err := r.callOnAPod()
	if err != nil {
		return doomedPod{}, err
	}
	logs.stop() // "kubectl logs -f" ends with the kubelet
	logs = r.followLogFile(pod)
	time.Sleep(time.Second)
	deleted := time.Now()
	if _, err := r.kubectl("delete", "pod", pod, "--wait=false"); err != nil {
		return doomedPod{}, err
	}
	r.logf("kubectl delete pod %s (call open through the Service)", pod)
	return doomedPod{pod, c, logs, deleted}, nil
}

// killAndRestart kills a process of the cluster (SIGKILL), waits until it is
// gone, and starts it again with e2e/run.sh's script for it.
func (r *run) killAndRestart(name string) (time.Time, error) {
	pidFile := filepath.Join(r.pidDir, name+".pid")
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return time.Time{}, fmt.Errorf("no -pids for %s: %w", name, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return time.Time{}, fmt.Errorf("%s: %w", pidFile, err)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		return time.Time{}, fmt.Errorf("kill %s (%d): %w", name, pid, err)
	}
	killed := time.Now()
	for alive(pid) && time.Since(killed) < 5*time.Second {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(restartAfter)
	cmd := exec.Command("bash", filepath.Join(r.pidDir, name+".sh"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return killed, fmt.Errorf("start %s again: %w", name, err)
	}
	go cmd.Wait()
	return killed, os.WriteFile(pidFile, []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o644)
}

// waitContainerd waits until containerd answers again.
func (r *run) waitContainerd(since time.Time) (time.Time, error) {
	ctr := strings.Fields(r.ctr)
	for time.Since(since) < time.Minute {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		err := exec.CommandContext(ctx, ctr[0], append(ctr[1:], "version")...).Run()
		cancel()
		if err == nil {
			return time.Now(), nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return time.Time{}, fmt.Errorf("containerd not answering a minute after its start")
}

// alive tells whether a process is still running (a zombie is not).
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	_, rest, _ := strings.Cut(string(b), ") ")
	return !strings.HasPrefix(rest, "Z") && !strings.HasPrefix(rest, "X")
}

// killContainer sends SIGKILL to a container's main process.
func (r *run) killContainer(pod, container string) (time.Time, error) {
	pid, err := r.containerPID(pod, container)
	if err != nil {
		return time.Time{}, err
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		return time.Time{}, fmt.Errorf("kill %s/%s (%d): %w", pod, container, pid, err)
	}
	return time.Now(), nil
}

// containerPID is the host PID of a container's main process, from containerd.
func (r *run) containerPID(pod, container string) (int, error) {
	out, err := r.kubectl("get", "pod", pod, "-o", fmt.Sprintf(
		`jsonpath={.status.containerStatuses[?(@.name=="%s")].containerID}{.status.initContainerStatuses[?(@.name=="%s")].containerID}`,
		container, container))
	if err != nil {
		return 0, err
	}
	id := strings.TrimPrefix(strings.TrimSpace(out), "containerd://")
	if id == "" {
		return 0, fmt.Errorf("no container %s in %s", container, pod)
	}
	ctr := strings.Fields(r.ctr)
	tasks, err := exec.Command(ctr[0], append(ctr[1:], "tasks", "ls")...).CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("%s tasks ls: %v\n%s", r.ctr, err, tasks)
	}
	for _, l := range strings.Split(string(tasks), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == id {
			return strconv.Atoi(f[1])
		}
	}
	return 0, fmt.Errorf("no task %s (%s/%s) in containerd", id, pod, container)
}

// followLogFile collects the wsdrain container's log from the file the
// node writes, which outlives a kubelet restart (kubectl logs -f does not),
// until the pod is gone. Each CRI log line starts with its time, stream and
// tag, dropped here.
func (r *run) followLogFile(pod string) *logFollower {
	lf := newLogFollower()
	go func() {
		defer close(lf.done)
		var f *os.File
		for f == nil {
			files, _ := filepath.Glob(filepath.Join(r.podLogs, "default_"+pod+"_*", "wsdrain", "0.log"))
			if len(files) > 0 {
				f, _ = os.Open(files[0])
			}
			if f == nil {
				if r.w.seen("gone", pod) {
					return
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
		defer f.Close()
		rd := bufio.NewReader(f)
		partial := ""
		for {
			line, err := rd.ReadString('\n')
			partial += line
			if err == nil {
				if p := strings.SplitN(partial, " ", 4); len(p) == 4 {
					lf.write(p[3])
				}
				partial = ""
				continue
			}
			if err != io.EOF || r.w.seen("gone", pod) {
				return
			}
			select {
			case <-lf.quit:
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	return lf
}
