// exclusions.go says which connections on the app's port are not calls (peers in
// an --ignore-peer network, connections idle for --ignore-idle) and holds the
// counting flags that proxy, stopper and count share.

package main

import (
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"strings"
	"time"
)

// tally is one count of the app's port: the calls and, for the log, what was left out.
type tally struct{ calls, excludedPeer, excludedIdle int }

type exclusions struct {
	peers []netip.Prefix
	idle  time.Duration // 0: idleness excludes nothing
}

// excludesPeer: an IPv4 network also matches IPv4-mapped remotes, as the kernel's filter does.
func (e exclusions) excludesPeer(remote netip.Addr) bool {
	for _, p := range e.peers {
		if p.Contains(remote) || p.Contains(remote.Unmap()) {
			return true
		}
	}
	return false
}

func (e exclusions) String() string {
	if len(e.peers) == 0 && e.idle == 0 {
		return "none: every ESTABLISHED connection is a call"
	}
	var parts []string
	if len(e.peers) > 0 {
		parts = append(parts, "peers in "+peerList(e.peers).String())
	}
	if e.idle > 0 {
		parts = append(parts, "connections idle for "+e.idle.String())
	}
	return strings.Join(parts, ", ")
}

const (
	maxPeers = 32          // keeps the kernel's filter program small
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
