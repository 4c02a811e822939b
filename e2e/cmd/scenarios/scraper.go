package main

// scraper.go: a metrics scraper that keeps a connection open on the app's
// call port, as Prometheus does, and what it does to a drain with and
// without --ignore-peer.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"
)

// scraper: a keep-alive scraper polls the app's /metrics on the call port
// every second, from an address of its own. With --ignore-peer of that
// address the old pod goes within seconds of the last call while the scraper
// stays connected, and the proxy's /metrics counts the call alone; without
// it the scraper's connection holds the drain after the last call.
func (r *run) scraper() error {
	if r.scraperIP == "" {
		return errors.New("no -scraper-ip to scrape from")
	}
	if err := r.scraperIgnored(); err != nil {
		return err
	}
	return r.scraperCounted()
}

// scraperIgnored runs a rolling update under a call and the scraper, with
// the scraper's address excluded on the proxy and the stopper.
func (r *run) scraperIgnored() error {
	peer := [2]string{"# - --ignore-peer=10.0.5.0/24", "- --ignore-peer=" + r.scraperIP + "/32"}
	if err := r.deploy("the scraper's address is not calls", r.appImage, true, peer); err != nil {
		return err
	}
	if err := r.waitReady(2); err != nil {
		return err
	}
	pod, ip, logs, c, err := r.callOnAPod()
	if err != nil {
		return err
	}
	s, err := startScraper(r.scraperIP, ip)
	if err != nil {
		return err
	}
	defer s.stop()
	r.logf("call and keep-alive scraper (from %s) on %s (%s)", r.scraperIP, pod, ip)
	time.Sleep(2500 * time.Millisecond) // the proxy's count is at most a second old
	n, err := proxyConnections(ip)
	r.check("wsdrain_connections on the pod's /metrics during the call, scraper connected", err == nil && n == "1", "%s%v", n, errOrNil(err))
	deleting, err := r.restartUntilDeleting(pod)
	if err != nil {
		return err
	}
	time.Sleep(time.Until(deleting.at.Add(7 * time.Second))) // past --min-drain
	// The call's end: the client starts closing it.
	ended := time.Now()
	stats := c.end()
	atEnd := s.snapshot()
	r.logf("call ended by the client: %s; scraper: %s", stats, atEnd)
	gone, err := r.w.waitEvent("gone", pod, r.start, 60*time.Second)
	if err != nil {
		return err
	}
	d := gone.at.Sub(ended)
	r.check("old pod gone ≤3s after the last call, scraper still connected", d <= 3*time.Second && atEnd.keptOneConnection(),
		"%s, scraper %s", ms(d), atEnd)
	out := logs.wait()
	r.preStops = append(r.preStops, preStopCheck{r.scenario, pod, out})
	_, err = r.kubectl("rollout", "status", "deployment/voicebot", "--timeout=240s")
	return err
}

// scraperCounted deletes a pod with a call and the scraper on it, the
// manifest as shipped (no exclusion): after the call's end the scraper
// alone holds the drain, until it goes.
func (r *run) scraperCounted() error {
	if err := r.deploy("the scraper counted: no --ignore-peer", r.appImage, true); err != nil {
		return err
	}
	if err := r.waitReady(2); err != nil {
		return err
	}
	// The call first, through the Service; the scraper then to its pod.
	pod, ip, logs, c, err := r.callOnAPod()
	if err != nil {
		return err
	}
	s, err := startScraper(r.scraperIP, ip)
	if err != nil {
		return err
	}
	defer s.stop()
	p := doomedPod{pod, c, logs, time.Now()}
	if _, err := r.kubectl("delete", "pod", pod, "--wait=false"); err != nil {
		return err
	}
	r.logf("kubectl delete pod %s (call and scraper open, no exclusions)", pod)
	time.Sleep(time.Until(p.deleted.Add(7 * time.Second))) // past --min-drain
	stats := p.call.end()
	r.logf("call ended by the client: %s", stats)
	time.Sleep(5 * time.Second)
	_, goneEarly := r.w.eventDetail("gone", pod, "")
	last := lastLine(p.logs.sofar(), `msg="connections open"`)
	r.logf("5s after the call's end: pod gone %v; stopper: %s", goneEarly, last)
	r.check("without exclusions the scraper holds the drain after the last call",
		!goneEarly && strings.Contains(last, "count=1 "), "%s, pod still there %v", field(last, "count"), !goneEarly)
	atStop := s.stop()
	left := time.Now()
	r.logf("scraper stopped: %s", atStop)
	gone, err := r.w.waitEvent("gone", pod, r.start, 60*time.Second)
	if err != nil {
		return err
	}
	d := gone.at.Sub(left)
	r.check("pod gone ≤3s after the scraper left", d <= 3*time.Second, "%s", ms(d))
	r.preStops = append(r.preStops, preStopCheck{r.scenario, pod, p.logs.wait()})
	return nil
}

// scrapeLoop polls http://IP:8080/metrics every second over one keep-alive
// connection, dialled from a given local address, until stopped.
type scrapeLoop struct {
	mu     sync.Mutex
	stats  scrapeStats
	quit   chan struct{}
	done   chan struct{}
	client *http.Client
	url    string
}

type scrapeStats struct {
	dials, scrapes int
	err            error
}

func (s scrapeStats) keptOneConnection() bool { return s.dials == 1 && s.err == nil && s.scrapes > 3 }

func (s scrapeStats) String() string {
	return fmt.Sprintf("%d scrapes over %d connection(s)%v", s.scrapes, s.dials, errOrNil(s.err))
}

func startScraper(from, ip string) (*scrapeLoop, error) {
	s := &scrapeLoop{quit: make(chan struct{}), done: make(chan struct{}), url: "http://" + ip + ":8080/metrics"}
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 2 * time.Second}
	// As Prometheus by default: a scrape may take up to 10s on a busy node.
	s.client = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		MaxIdleConnsPerHost: 1,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			s.mu.Lock()
			s.stats.dials++
			s.mu.Unlock()
			return d.DialContext(ctx, network, addr)
		},
	}}
	if err := s.scrape(); err != nil {
		return nil, fmt.Errorf("scraper: %w", err)
	}
	go s.loop()
	return s, nil
}

func (s *scrapeLoop) loop() {
	defer close(s.done)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-s.quit:
			return
		case <-tick.C:
			s.scrape()
		}
	}
}

func (s *scrapeLoop) scrape() error {
	resp, err := s.client.Get(s.url)
	if err == nil {
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err == nil {
		s.stats.scrapes++
	} else if s.stats.err == nil {
		s.stats.err = err
	}
	return err
}

func (s *scrapeLoop) snapshot() scrapeStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stats
}

// stop ends the scraping and closes its connection; it may be called again.
func (s *scrapeLoop) stop() scrapeStats {
	select {
	case <-s.quit:
	default:
		close(s.quit)
	}
	<-s.done
	s.client.CloseIdleConnections()
	return s.snapshot()
}

// proxyConnections reads wsdrain_connections from the proxy's /metrics.
func proxyConnections(ip string) (string, error) {
	resp, err := http.Get("http://" + ip + ":8081/metrics")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), `wsdrain_connections{port="8080"} `); ok {
			return v, nil
		}
	}
	return "", errors.New("no wsdrain_connections line")
}

func errOrNil(err error) string {
	if err != nil {
		return ", " + err.Error()
	}
	return ""
}

func lastLine(text, containing string) string {
	lines := strings.Split(text, "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.Contains(lines[i], containing) {
			return lines[i]
		}
	}
	return "(no line with " + containing + ")"
}
