//go:build linux

package main

// Benchmarks of counting and of the proxy. bench/run.sh runs them against
// N live connections in a private network namespace and prints the table in
// BENCHMARKS.md; run alone, they measure the few sockets of this namespace.

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// benchPort is the port bench/run.sh filled with connections.
func benchPort(b *testing.B) uint16 {
	if p, err := strconv.Atoi(os.Getenv("WSDRAIN_BENCH_PORT")); err == nil {
		return uint16(p)
	}
	return 8080
}

// benchCount runs count b.N times and reports CPU time per count and what
// was counted, in unit.
func benchCount(b *testing.B, unit string, count func(uint16) (int, error)) {
	port := benchPort(b)
	want, err := count(port)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	start := processCPU()
	for range b.N {
		if n, err := count(port); err != nil || n < want/2 {
			b.Fatalf("count = %d, %v", n, err)
		}
	}
	b.ReportMetric(float64(processCPU()-start)/float64(b.N)/1e6, "cpu-ms/op")
	b.ReportMetric(float64(want), unit)
}

func BenchmarkCountNetlink(b *testing.B) { benchNetlink(b, exclusions{}) }

// BenchmarkCountNetlinkIdle asks for each socket's tcp_info as well, as
// --ignore-idle does; with an hour, every connection still counts.
func BenchmarkCountNetlinkIdle(b *testing.B) { benchNetlink(b, exclusions{idle: time.Hour}) }

// BenchmarkCountNetlinkPeer tests each socket's remote address against one
// peer network, as --ignore-peer does; the network matches none of
// bench/run.sh's holders.
func BenchmarkCountNetlinkPeer(b *testing.B) {
	benchNetlink(b, exclusions{peers: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}})
}

func benchNetlink(b *testing.B, ex exclusions) {
	nl, err := newNetlinkSource()
	if err != nil {
		b.Skip(err)
	}
	defer nl.close()
	benchCount(b, "conns", callsOf(nl, ex))
}

// BenchmarkReadProcDiscard is the floor for any /proc parser: reading the
// tables through the same buffer and throwing the bytes away.
func BenchmarkReadProcDiscard(b *testing.B) {
	buf := make([]byte, 64<<10)
	benchCount(b, "bytes", func(uint16) (int, error) {
		total := 0
		for _, path := range procTables {
			f, err := os.Open(path)
			if err != nil {
				return 0, err
			}
			for {
				n, err := f.Read(buf)
				total += n
				if err != nil {
					break
				}
			}
			f.Close()
		}
		return total, nil
	})
}

func BenchmarkCountProc(b *testing.B) { benchCount(b, "conns", callsOf(newProcSource(), exclusions{})) }

// BenchmarkCountNaive is the baseline: the parser of the write-up this tool
// started from (bufio.Scanner and strings.Fields), given tcp6 as well.
func BenchmarkCountNaive(b *testing.B) { benchCount(b, "conns", naiveCount) }

func naiveCount(port uint16) (int, error) {
	want := fmt.Sprintf("%04X", port)
	n := 0
	for _, path := range procTables {
		f, err := os.Open(path)
		if err != nil {
			return 0, err
		}
		sc := bufio.NewScanner(f)
		sc.Scan()
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 10 {
				continue
			}
			parts := strings.Split(fields[1], ":")
			if len(parts) == 2 && fields[3] == "01" && strings.ToUpper(parts[1]) == want {
				n++
			}
		}
		f.Close()
		if err := sc.Err(); err != nil {
			return 0, err
		}
	}
	return n, nil
}

// BenchmarkParseTableInMemory is the per-line path alone: it must not
// allocate, whatever the number of lines; with -ignore-peer, every remote
// address is decoded and tested as well.
func BenchmarkParseTableInMemory(b *testing.B) {
	b.Run("port", func(b *testing.B) { benchParseTable(b, exclusions{}, 15000) })
	peers := exclusions{peers: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("fd00::/8")}}
	b.Run("port+peers", func(b *testing.B) { benchParseTable(b, peers, 15000) })
}

func benchParseTable(b *testing.B, ex exclusions, want int) {
	raw, err := os.ReadFile("testdata/tcp-sl10000")
	if err != nil {
		b.Fatal(err)
	}
	header, rows, _ := bytes.Cut(raw, []byte("\n"))
	table := append(append(header, '\n'), bytes.Repeat(rows, 1000)...)
	p := newProcSource()
	r := bytes.NewReader(table)
	b.ReportAllocs()
	b.SetBytes(int64(len(table)))
	b.ResetTimer()
	for range b.N {
		r.Reset(table)
		if s, err := p.readTable(portScan{}, r, 9090, ex); err != nil || s.calls != want {
			b.Fatalf("count = %d, %v", s.calls, err)
		}
	}
}

// benchProcess runs a command b.N times and reports its CPU time per run.
func benchProcess(b *testing.B, name string, args ...string) {
	if _, err := exec.LookPath(name); err != nil {
		b.Skip(err)
	}
	var cpu time.Duration
	for range b.N {
		cmd := exec.Command(name, args...)
		cmd.Stdout = io.Discard
		if err := cmd.Run(); err != nil {
			b.Fatalf("%s: %v", name, err)
		}
		cpu += cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	}
	b.ReportMetric(float64(cpu)/float64(b.N)/1e6, "cpu-ms/op")
}

// BenchmarkProcessWsdrainCount is "wsdrain count" as an operator runs it.
func BenchmarkProcessWsdrainCount(b *testing.B) {
	bin := os.Getenv("WSDRAIN_BIN")
	if bin == "" {
		b.Skip("set WSDRAIN_BIN to a built wsdrain (bench/run.sh does)")
	}
	benchProcess(b, bin, "count", "--target-port", strconv.Itoa(int(benchPort(b))))
}

// BenchmarkProcessSS is the same question put to ss, which also uses sock_diag.
func BenchmarkProcessSS(b *testing.B) {
	benchProcess(b, "ss", "-Htn", "state", "established", fmt.Sprintf("( sport = :%d )", benchPort(b)))
}

// BenchmarkProbe compares one readiness probe sent to the app directly with
// one sent through the real proxy binary, and reports the proxy's idle RSS.
func BenchmarkProbe(b *testing.B) {
	appURL := startBenchApp(b)
	proxyURL, pid := startBenchProxy(b, appURL)
	time.Sleep(500 * time.Millisecond)
	rss := procStatusKiB(b, pid, "VmRSS")

	// The kubelet opens a new connection for every probe.
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	for _, target := range []struct{ name, url string }{{"direct", appURL}, {"via-proxy", proxyURL}} {
		b.Run(target.name, func(b *testing.B) {
			lat := make([]time.Duration, 0, b.N)
			for range b.N {
				start := time.Now()
				resp, err := client.Get(target.url)
				if err != nil || resp.StatusCode != 200 {
					b.Fatalf("probe: %v", err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				lat = append(lat, time.Since(start))
			}
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
			b.ReportMetric(float64(rss), "proxy-idle-rss-KiB")
		})
	}
}

// BenchmarkProxyFlood opens 3 000 connections to the real proxy binary,
// holds them for 5 s and reports its peak resident set size (VmHWM).
func BenchmarkProxyFlood(b *testing.B) {
	for _, kind := range []struct{ name, send string }{
		{"idle", ""},
		{"keep-alive-after-a-probe", "GET /ready HTTP/1.1\r\nHost: pod\r\n\r\n"},
		{"drain-waiters", "GET /drain HTTP/1.1\r\nHost: pod\r\n\r\n"},
	} {
		b.Run(kind.name, func(b *testing.B) {
			for range b.N {
				url, pid := startBenchProxy(b, startBenchApp(b))
				before := procStatusKiB(b, pid, "VmHWM")
				conns := flood(b, strings.TrimPrefix(strings.TrimSuffix(url, "/ready"), "http://"), 3000, 100, kind.send)
				time.Sleep(5 * time.Second)
				b.ReportMetric(float64(before), "rss-before-KiB")
				b.ReportMetric(float64(procStatusKiB(b, pid, "VmHWM")), "peak-rss-KiB")
				// Its end: every slot is freed at once.
				for _, c := range conns {
					c.Close()
				}
				time.Sleep(2 * time.Second)
				b.ReportMetric(float64(procStatusKiB(b, pid, "VmHWM")), "peak-rss-with-end-KiB")
			}
		})
	}
}

// startBenchApp serves a health endpoint and returns its URL.
func startBenchApp(b *testing.B) string {
	app := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok\n") })}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	go app.Serve(ln)
	b.Cleanup(func() { app.Close() })
	return "http://" + ln.Addr().String() + "/healthz"
}

// startBenchProxy starts "wsdrain proxy" (WSDRAIN_BIN, else this test
// binary as wsdrain) and returns its URL and pid.
func startBenchProxy(b *testing.B, health string) (string, int) {
	addr := benchFreeAddr(b)
	bin := os.Getenv("WSDRAIN_BIN")
	cmd := exec.Command(bin, "proxy", "--listen", addr, "--health-url", health, "--fifo", filepath.Join(b.TempDir(), "drain.fifo"))
	if bin == "" {
		cmd = wsdrainCmd("proxy", "--listen", addr, "--health-url", health, "--fifo", filepath.Join(b.TempDir(), "drain.fifo"))
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() })
	for i := 0; ; i++ {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			break
		}
		if i == 500 {
			b.Fatal("proxy did not start")
		}
		time.Sleep(10 * time.Millisecond)
	}
	return "http://" + addr + "/ready", cmd.Process.Pid
}

func benchFreeAddr(b *testing.B) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func init() {
	testRoles["holder"] = runBenchHolder
	testRoles["churn"] = runBenchChurn
}

// runBenchChurn, for bench/drain.sh, listens on addr and connects to itself,
// resetting each connection at once, as fast as it can until killed: destroy
// events on a port that is not the app's.
func runBenchChurn(args []string) int {
	ln, err := net.Listen("tcp", args[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("ready")
	for {
		c, s, err := dialSelf(ln)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		c.(*net.TCPConn).SetLinger(0) // a reset: no TIME_WAIT, no port runs short
		c.Close()
		s.Close()
	}
}

// dialSelf opens a connection to ln and accepts it.
func dialSelf(ln net.Listener) (c, s net.Conn, err error) {
	if c, err = net.Dial("tcp", ln.Addr().String()); err != nil {
		return nil, nil, err
	}
	s, err = ln.Accept()
	return c, s, err
}

// runBenchHolder holds connections for bench/run.sh: it listens on addr,
// opens n connections to itself, says "ready" and keeps them until SIGTERM.
// Given a rate, SIGUSR1 makes it close that many connections a second, to
// load the stopper with destroy events. The hard open-files limit (20 000
// here) is why several run.
func runBenchHolder(args []string) int {
	if len(args) < 2 || len(args) > 3 {
		fmt.Fprintln(os.Stderr, "usage: holder ADDR N [CLOSES_PER_SECOND]")
		return 2
	}
	n, _ := strconv.Atoi(args[1])
	rate := 0.0
	if len(args) == 3 {
		rate, _ = strconv.ParseFloat(args[2], 64)
	}
	ln, err := net.Listen("tcp", args[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	conns := make([]net.Conn, 0, 2*n)
	for range n {
		c, s, err := dialSelf(ln)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		conns = append(conns, c, s)
	}
	stop, start := make(chan os.Signal, 1), make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM)
	signal.Notify(start, syscall.SIGUSR1)
	fmt.Println("ready")
	var tick <-chan time.Time
	for {
		select {
		case <-start:
			if rate > 0 {
				tick = time.NewTicker(time.Duration(float64(time.Second) / rate)).C
			}
		case <-tick:
			if len(conns) >= 2 {
				conns[0].Close()
				conns[1].Close()
				conns = conns[2:]
			}
		case <-stop:
			for _, c := range conns {
				c.Close()
			}
			return 0
		}
	}
}

// BenchmarkReaction drains b.N times, as bench/run.sh runs it in a network
// namespace of its own: a fresh app, two calls, a stopper polling every 5s,
// the calls closed one after the other; it reports the time from the last
// close to the app's SIGTERM.
func BenchmarkReaction(b *testing.B) {
	if os.Getenv("WSDRAIN_BENCH_PORT") == "" {
		b.Skip("run by bench/run.sh, in a network namespace of its own")
	}
	port := strconv.Itoa(int(benchPort(b)))
	var took []time.Duration
	for range b.N {
		took = append(took, drainOnce(b, port))
	}
	slices.Sort(took)
	rank := func(p float64) float64 { return float64(took[int(math.Ceil(p*float64(len(took))))-1]) / 1e6 }
	b.ReportMetric(rank(0.50), "p50-ms")
	b.ReportMetric(rank(0.99), "p99-ms")
	b.ReportMetric(float64(took[len(took)-1])/1e6, "max-ms")
}

// drainOnce runs one drain of BenchmarkReaction.
func drainOnce(b *testing.B, port string) time.Duration {
	app := exec.Command(os.Args[0], "--port", port)
	app.Env = append(os.Environ(), "WSDRAIN_TEST_ROLE=app")
	appOut := lines(b, app.StdoutPipe)
	if err := app.Start(); err != nil {
		b.Fatal(err)
	}
	defer app.Wait()
	defer app.Process.Kill()
	if line := <-appOut; !strings.HasPrefix(line, "listening") {
		b.Fatalf("app: %q", line)
	}
	// Two calls: the first one's end makes the stopper count at once
	// (count=1), and the second ends right after that count, when the rate
	// limit would hold an answer back: the worst case for the reaction.
	var calls []net.Conn
	for range 2 {
		call, err := net.Dial("tcp", "127.0.0.1:"+port)
		if err != nil {
			b.Fatal(err)
		}
		fmt.Fprintf(call, "GET /call HTTP/1.1\r\nHost: app\r\n\r\n")
		if line, err := bufio.NewReader(call).ReadString('\n'); err != nil || line != "connected\n" {
			b.Fatalf("call: %q %v", line, err)
		}
		calls = append(calls, call)
	}
	stopper := wsdrainCmd("stopper", "--target-port", port, "--fifo", filepath.Join(b.TempDir(), "drain.fifo"),
		"--interval", "5s", "--min-drain", "0s")
	stopperLog := lines(b, stopper.StderrPipe)
	if err := stopper.Start(); err != nil {
		b.Fatal(err)
	}
	defer stopper.Wait()
	waitLog := func(want string) {
		for line := range stopperLog {
			if strings.Contains(line, want) {
				return
			}
		}
		b.Fatalf("the stopper ended before it logged %s", want)
	}
	waitLog("count=2")
	calls[0].Close()
	waitLog("count=1")
	closed := time.Now()
	calls[1].Close()
	if line := <-appOut; line != "app: got terminated" {
		b.Fatalf("app: %q", line)
	}
	took := time.Since(closed)
	go func() {
		for range stopperLog {
		}
	}()
	return took
}

// lines starts a reader of a command's output pipe, one line at a time.
func lines(b *testing.B, pipe func() (io.ReadCloser, error)) <-chan string {
	r, err := pipe()
	if err != nil {
		b.Fatal(err)
	}
	ch := make(chan string, 16)
	go func() {
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			ch <- sc.Text()
		}
		close(ch)
	}()
	return ch
}
