package main

// watch.go follows pods and EndpointSlices through the API server's watch
// streams and timestamps every change as it arrives.

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net/http"
	"sync"
	"time"
)

type event struct {
	at     time.Time
	kind   string // added, ready, unready, deleting, exited, gone, serving, not-serving
	pod    string
	detail string
}

type podState struct {
	ip       string
	ready    bool
	deleting bool
	exited   map[string]bool
}

type watcher struct {
	mu      sync.Mutex
	events  []event
	pods    map[string]*podState
	serving map[string]bool
	changed chan struct{}
	logf    func(string, ...any)
}

func startWatcher(api, token string, logf func(string, ...any)) (*watcher, error) {
	w := &watcher{pods: map[string]*podState{}, serving: map[string]bool{}, changed: make(chan struct{}), logf: logf}
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	for path, handle := range map[string]func([]byte, string){
		"/api/v1/namespaces/default/pods?watch=1&labelSelector=app%3Dvoicebot":                                                      w.pod,
		"/apis/discovery.k8s.io/v1/namespaces/default/endpointslices?watch=1&labelSelector=kubernetes.io%2Fservice-name%3Dvoicebot": w.slice,
	} {
		req, _ := http.NewRequest("GET", api+path+"&timeoutSeconds=3600", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := client.Do(req)
		if err != nil {
			return nil, fmt.Errorf("watch %s: %w", path, err)
		}
		if resp.StatusCode != 200 {
			return nil, fmt.Errorf("watch %s: %s", path, resp.Status)
		}
		go func() {
			dec := json.NewDecoder(resp.Body)
			for {
				var ev struct {
					Type   string          `json:"type"`
					Object json.RawMessage `json:"object"`
				}
				if err := dec.Decode(&ev); err != nil {
					logf("WATCH ENDED %s: %v", path, err)
					return
				}
				if ev.Type == "ERROR" { // a Status: the stream ends here
					logf("WATCH FAILED %s: %s", path, ev.Object)
					return
				}
				handle(ev.Object, ev.Type)
			}
		}()
	}
	return w, nil
}

type podObject struct {
	Metadata struct {
		Name              string  `json:"name"`
		DeletionTimestamp *string `json:"deletionTimestamp"`
	} `json:"metadata"`
	Status struct {
		PodIP      string `json:"podIP"`
		Conditions []struct {
			Type, Status string
		} `json:"conditions"`
		ContainerStatuses     []containerStatus `json:"containerStatuses"`
		InitContainerStatuses []containerStatus `json:"initContainerStatuses"` // native sidecars
	} `json:"status"`
}

type containerStatus struct {
	Name  string `json:"name"`
	State struct {
		Terminated *struct {
			ExitCode int    `json:"exitCode"`
			Reason   string `json:"reason"`
		} `json:"terminated"`
	} `json:"state"`
}

func (w *watcher) pod(raw []byte, typ string) {
	var p podObject
	if json.Unmarshal(raw, &p) != nil {
		return
	}
	now := time.Now()
	w.mu.Lock()
	defer w.mu.Unlock()
	defer w.notify()
	name := p.Metadata.Name
	s := w.pods[name]
	if s == nil {
		s = &podState{exited: map[string]bool{}}
		w.pods[name] = s
		w.add(event{now, "added", name, ""})
	}
	if typ == "DELETED" {
		delete(w.pods, name)
		w.add(event{now, "gone", name, ""})
		return
	}
	s.ip = p.Status.PodIP
	ready := false
	for _, c := range p.Status.Conditions {
		if c.Type == "Ready" {
			ready = c.Status == "True"
		}
	}
	if ready != s.ready {
		s.ready = ready
		w.add(event{now, map[bool]string{true: "ready", false: "unready"}[ready], name, ""})
	}
	if p.Metadata.DeletionTimestamp != nil && !s.deleting {
		s.deleting = true
		w.add(event{now, "deleting", name, ""})
	}
	for _, cs := range append(p.Status.ContainerStatuses, p.Status.InitContainerStatuses...) {
		if t := cs.State.Terminated; t != nil && !s.exited[cs.Name] {
			s.exited[cs.Name] = true
			w.add(event{now, "exited", name, fmt.Sprintf("container=%s exitCode=%d reason=%s", cs.Name, t.ExitCode, t.Reason)})
		}
	}
}

func (w *watcher) slice(raw []byte, typ string) {
	var s struct {
		Endpoints []struct {
			TargetRef  *struct{ Name string } `json:"targetRef"`
			Conditions struct {
				Serving *bool `json:"serving"`
			} `json:"conditions"`
		} `json:"endpoints"`
	}
	if json.Unmarshal(raw, &s) != nil || typ == "DELETED" {
		return
	}
	now := time.Now()
	w.mu.Lock()
	defer w.mu.Unlock()
	defer w.notify()
	for _, ep := range s.Endpoints {
		if ep.TargetRef == nil || ep.Conditions.Serving == nil {
			continue
		}
		name, serving := ep.TargetRef.Name, *ep.Conditions.Serving
		if old, seen := w.serving[name]; !seen || old != serving {
			w.serving[name] = serving
			w.add(event{now, map[bool]string{true: "serving", false: "not-serving"}[serving], name, "EndpointSlice"})
		}
	}
}

// add records and prints an event; w.mu is held.
func (w *watcher) add(e event) {
	w.events = append(w.events, e)
	detail := ""
	if e.detail != "" {
		detail = " (" + e.detail + ")"
	}
	w.logf("%-12s %s%s", e.kind, e.pod, detail)
}

// notify wakes waiters; w.mu is held.
func (w *watcher) notify() {
	close(w.changed)
	w.changed = make(chan struct{})
}

// waitEvent returns the first event of kind for pod at or after since,
// whether it has already arrived or not.
func (w *watcher) waitEvent(kind, pod string, since time.Time, timeout time.Duration) (event, error) {
	deadline := time.After(timeout)
	for {
		w.mu.Lock()
		for _, e := range w.events {
			if e.kind == kind && e.pod == pod && !e.at.Before(since) {
				w.mu.Unlock()
				return e, nil
			}
		}
		changed := w.changed
		w.mu.Unlock()
		select {
		case <-changed:
		case <-deadline:
			return event{}, fmt.Errorf("no %q event for %s within %v", kind, pod, timeout)
		}
	}
}

// waitNoPods waits until no pod of the app is left.
func (w *watcher) waitNoPods(timeout time.Duration) error {
	deadline := time.After(timeout)
	for {
		w.mu.Lock()
		n, changed := len(w.pods), w.changed
		w.mu.Unlock()
		if n == 0 {
			return nil
		}
		select {
		case <-changed:
		case <-deadline:
			return fmt.Errorf("%d pods still there after %v", n, timeout)
		}
	}
}

// eventDetail returns the detail of the first matching event with a prefix.
func (w *watcher) eventDetail(kind, pod, prefix string) (event, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, e := range w.events {
		if e.kind == kind && e.pod == pod && len(e.detail) >= len(prefix) && e.detail[:len(prefix)] == prefix {
			return e, true
		}
	}
	return event{}, false
}

// seen tells whether an event of kind has arrived for pod.
func (w *watcher) seen(kind, pod string) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, e := range w.events {
		if e.kind == kind && e.pod == pod {
			return true
		}
	}
	return false
}

// readyPods lists the pods that are ready and not being deleted.
func (w *watcher) readyPods() map[string]string {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := map[string]string{}
	for name, s := range w.pods {
		if s.ready && !s.deleting && s.ip != "" {
			out[name] = s.ip
		}
	}
	return out
}
