// Wsdrain lets a Kubernetes pod holding long-lived WebSocket (or any TCP)
// connections end only after its last call, without changing the app. In a
// sidecar, "wsdrain proxy" answers the readiness probe with the app's health
// until the pod drains, then 503, and holds the app's preStop (GET /drain);
// "wsdrain stopper", the sidecar's preStop, drains, waits for no ESTABLISHED
// connection on the app's port, then releases the preStop and signals the app.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"
)

var version string // stamped at link time: -ldflags "-X main.version=v1.2.3"

const usage = `wsdrain: drain a pod's long-lived connections before it stops

usage:
  wsdrain proxy   [flags]   readiness proxy; runs for the pod's whole life
  wsdrain stopper [flags]   preStop hook: drain, wait for zero connections, stop the app
  wsdrain count   [flags]   print the ESTABLISHED connections on the app's port
  wsdrain version           print the version

Run "wsdrain MODE -h" for a mode's flags. Exit codes: 0 done, 1 failure, 2 bad usage.
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(exitCode(err, os.Stderr))
}

// exitCode prints err the way a person reads it and maps it to 0, 1 or 2.
func exitCode(err error, stderr io.Writer) int {
	if err == nil || errors.Is(err, flag.ErrHelp) {
		return 0
	}
	fmt.Fprintf(stderr, "wsdrain: %v\n", err)
	if he, ok := errors.AsType[hintError](err); ok {
		fmt.Fprintf(stderr, "hint: %s\n", he.hint)
	}
	if _, ok := errors.AsType[usageError](err); ok {
		return 2
	}
	return 1
}

// run dispatches to a mode; it is main without the process-wide effects.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return usageError{errors.New("no mode given")}
	}
	switch mode, rest := args[0], args[1:]; mode {
	case "proxy":
		return runProxy(ctx, rest, stdout)
	case "stopper":
		return runStopper(ctx, rest, stdout, stderr)
	case "count":
		return runCount(rest, stdout, stderr)
	case "version":
		_, err := fmt.Fprintf(stdout, "wsdrain %s\n", buildVersion())
		return err
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stdout, usage)
		return flag.ErrHelp
	}
	return usageError{fmt.Errorf("unknown mode %q (want proxy, stopper, count or version)", args[0])}
}

const stopperHelp = `usage: wsdrain stopper [flags]

The sidecar's preStop hook. Tells the proxy to drain (readiness 503), waits
until no call is left on --target-port and --min-drain has passed, then
signals the app and releases the app's preStop. In a PID namespace of the
sidecar's own it signals nothing: the kubelet signals the app once its preStop
is released. Its log is copied to the proxy's (kubectl logs).

example:
  wsdrain stopper --target-port 8080 --fifo /run/wsdrain/drain.fifo --timeout 570s

exit status: 0 the app was signalled or released (or an earlier run did it),
1 no target was found, it could not be signalled or released, 2 bad usage.
`

type stopperConfig struct {
	calls
	fifo     string
	interval time.Duration
	minDrain time.Duration
	timeout  time.Duration
	exitWait time.Duration
	signal   syscall.Signal
}

func parseStopperFlags(args []string, stdout io.Writer) (stopperConfig, error) {
	fs := flag.NewFlagSet("stopper", flag.ContinueOnError)
	fifo := fs.String("fifo", "/run/wsdrain/drain.fifo", "the proxy's drain `pipe`")
	interval := durationFlag{d: time.Second}
	minDrain := durationFlag{d: 5 * time.Second, allowZero: true}
	timeout := durationFlag{allowZero: true}
	exitWait := durationFlag{d: 10 * time.Second, allowZero: true}
	fs.Var(&interval, "interval", "count at least once every `duration`; with netlink a call's end wakes the stopper at once")
	fs.Var(&minDrain, "min-drain", "never stop the app sooner than this `duration` after the drain began: Services and load balancers may still send new calls meanwhile")
	fs.Var(&timeout, "timeout", "stop the app anyway after this `duration`, so it gets SIGTERM and not the kubelet's SIGKILL; keep it 30s below terminationGracePeriodSeconds; 0 waits for ever")
	fs.Var(&exitWait, "exit-wait", "after the signal or release, wait up to this `duration` for the app to exit")
	sigName := fs.String("signal", "TERM", "the `signal`: TERM, INT, QUIT, HUP, USR1 or USR2")
	flags := addCallFlags(fs)
	if err := parseFlags(fs, stopperHelp, args, stdout); err != nil {
		return stopperConfig{fifo: *fifo}, err
	}
	sig, err := parseSignal(*sigName)
	if err != nil {
		return stopperConfig{fifo: *fifo}, err
	}
	c, err := flags.calls("stopper")
	if err != nil {
		return stopperConfig{fifo: *fifo}, err
	}
	return stopperConfig{calls: c, fifo: *fifo, interval: interval.d, minDrain: minDrain.d, timeout: timeout.d,
		exitWait: exitWait.d, signal: sig}, nil
}

const (
	maxPeers = 32          // each is tested against every connection of a count
	minIdle  = time.Second // below it, a call that merely paused would stop counting
)

// calls says what counts as a call, alike for /metrics, count and the stopper.
type calls struct {
	port    uint16
	source  sourceFlag
	exclude exclusions
}

type callFlags struct {
	port   portFlag
	source sourceFlag
	peers  peerList
	idle   durationFlag
}

func addCallFlags(fs *flag.FlagSet) *callFlags {
	f := &callFlags{port: 8080, source: "auto", idle: durationFlag{allowZero: true}}
	fs.Var(&f.port, "target-port", "the app's `port`: connections on it are the calls")
	fs.Var(&f.source, "source", "the counts' `source`: netlink (sock_diag), proc (/proc/net/tcp and tcp6), or auto: netlink unless refused")
	fs.Var(&f.peers, "ignore-peer", "connections from this `CIDR` are not calls: a metrics scraper, a mesh proxy's pool; repeatable; an IPv4 network also matches IPv4-mapped remotes")
	fs.Var(&f.idle, "ignore-idle", "connections idle for this `duration` are not calls: no data either way and none queued; at least 1s, above the app's own ping period; needs netlink")
	return f
}

// calls checks the flags together; --ignore-idle needs sock_diag, so auto means netlink.
func (f *callFlags) calls(mode string) (calls, error) {
	c := calls{port: uint16(f.port), source: f.source, exclude: exclusions{peers: f.peers, idle: f.idle.d}}
	switch {
	case c.exclude.idle > 0 && c.exclude.idle < minIdle:
		return calls{}, usageError{fmt.Errorf("%s: invalid value %q for flag --ignore-idle: want at least %v, above the app's own keep-alive or ping period", mode, f.idle.d, minIdle)}
	case c.exclude.idle > 0 && c.source == "proc":
		return calls{}, usageError{fmt.Errorf("%s: --ignore-idle needs --source netlink or auto: /proc/net/tcp does not show when data last moved on a connection", mode)}
	case c.exclude.idle > 0:
		c.source = "netlink"
	}
	return c, nil
}

type peerList []netip.Prefix

func (l peerList) String() string {
	s := make([]string, len(l))
	for i, p := range l {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

func (l *peerList) Set(s string) error {
	if len(*l) == maxPeers {
		return fmt.Errorf("at most %d networks", maxPeers)
	}
	p, err := parsePeer(s)
	if err == nil {
		*l = append(*l, p)
	}
	return err
}

// parsePeer reads a CIDR such as 10.0.0.0/8 or fd00::/8, or one address.
func parsePeer(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		a, aerr := netip.ParseAddr(s)
		if aerr != nil || a.Zone() != "" {
			return netip.Prefix{}, errors.New("want a network such as 10.0.0.0/8, fd00::/8 or one address")
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	if p.Masked() != p {
		return netip.Prefix{}, fmt.Errorf("has bits set past the /%d mask; did you mean %v?", p.Bits(), p.Masked())
	}
	// ::ffff:10.0.0.0/104 is 10.0.0.0/8: read as IPv4, it matches IPv4 sockets too.
	if p.Addr().Is4In6() && p.Bits() >= 96 {
		p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
	}
	// A few wide networks add up to all of IPv4 (0.0.0.0/1, 128.0.0.0/1).
	if p.Addr().Is4() && p.Bits() < 8 {
		return netip.Prefix{}, errors.New("an IPv4 network wider than /8 leaves too few calls to wait for")
	}
	if p.Addr().Is6() && p.Bits() <= 96 && p.Contains(netip.AddrFrom16([16]byte{10: 0xff, 11: 0xff})) {
		return netip.Prefix{}, errors.New("holds every IPv4 client (::ffff:0:0/96), which leaves too few calls to wait for")
	}
	return p, nil
}

type usageError struct{ error } // a mistake in the command line: exit status 2

// hintError carries a line telling the user what to change.
type hintError struct {
	error
	hint string
}

// parseFlags parses args quietly, so that an error is one line; -h prints the help and flags.
func parseFlags(fs *flag.FlagSet, help string, args []string, out io.Writer) error {
	fs.SetOutput(io.Discard)
	err := fs.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(out, help, "\nflags:\n")
		fs.VisitAll(func(f *flag.Flag) {
			arg, usage := flag.UnquoteUsage(f)
			if f.DefValue != "" && f.DefValue != "0s" && f.DefValue != "[]" {
				usage += " (default " + f.DefValue + ")"
			}
			fmt.Fprintf(out, "  --%s %s\n      %s\n", f.Name, arg, usage)
		})
		return err
	}
	if err != nil {
		dashes := strings.NewReplacer("flag -", "flag --", "defined: -", "defined: --")
		return usageError{fmt.Errorf("%s: %s", fs.Name(), dashes.Replace(err.Error()))} // --flag, as everywhere
	}
	if fs.NArg() > 0 {
		return usageError{fmt.Errorf("%s: unexpected argument %q", fs.Name(), fs.Arg(0))}
	}
	return nil
}

// portFlag is a TCP port: 1–65535, checked when it is parsed.
type portFlag uint16

func (p *portFlag) String() string { return strconv.Itoa(int(*p)) }

func (p *portFlag) Set(s string) error {
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > 65535 {
		return errors.New("want a port number from 1 to 65535")
	}
	*p = portFlag(n)
	return nil
}

// durationFlag is a time.Duration that refuses negative values, and zero unless allowZero.
type durationFlag struct {
	d         time.Duration
	allowZero bool
}

func (f *durationFlag) String() string { return f.d.String() }

func (f *durationFlag) Set(s string) error {
	d, err := time.ParseDuration(s)
	switch {
	case err != nil:
		return errors.New("want a duration such as 500ms, 10s or 9m30s")
	case d < 0:
		return errors.New("must not be negative")
	case d == 0 && !f.allowZero:
		return errors.New("must be greater than zero")
	}
	f.d = d
	return nil
}

// buildVersion is the stamped version, else what the Go toolchain recorded.
func buildVersion() string {
	if version != "" {
		return version
	}
	if info, ok := debug.ReadBuildInfo(); ok && info.Main.Version != "" {
		return info.Main.Version
	}
	return "(devel)"
}

const countHelp = `usage: wsdrain count [flags]

Prints the calls: ESTABLISHED connections whose local port is --target-port,
in this network namespace, less those the --ignore flags leave out.

example:
  kubectl exec POD -c wsdrain -- /wsdrain count --target-port 8080 --ignore-peer 10.0.5.7
`

func runCount(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("count", flag.ContinueOnError)
	flags := addCallFlags(fs)
	if err := parseFlags(fs, countHelp, args, stdout); err != nil {
		return err
	}
	c, err := flags.calls("count")
	if err != nil {
		return err
	}
	src, err := openSource(c, func(msg string, err error) { fmt.Fprintf(stderr, "wsdrain: %s: %v\n", msg, err) })
	if err != nil {
		return fmt.Errorf("count: %w", err)
	}
	t, err := src.established(c.port, c.exclude)
	if err != nil {
		return fmt.Errorf("count: %w", err)
	}
	fmt.Fprintln(stdout, t.calls)
	return nil
}
