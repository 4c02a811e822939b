package main

import (
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
)

func TestParsePeer(t *testing.T) {
	tests := []struct {
		in, want, err string
	}{
		{in: "10.0.0.0/8", want: "10.0.0.0/8"},
		{in: "fd00::/8", want: "fd00::/8"},
		{in: "10.1.2.3", want: "10.1.2.3/32"},
		{in: "2001:db8::7", want: "2001:db8::7/128"},
		{in: "::ffff:10.0.0.0/104", want: "10.0.0.0/8"}, // the IPv4 network, written as IPv6
		{in: "10.1.2.3/8", err: "did you mean 10.0.0.0/8?"},
		{in: "fd00:10:244::/56", want: "fd00:10:244::/56"}, // a cluster's pod range
		{in: "0.0.0.0/0", err: "wider than /8"},
		{in: "0.0.0.0/1", err: "wider than /8"}, // with 128.0.0.0/1, all of IPv4
		{in: "128.0.0.0/1", err: "wider than /8"},
		{in: "10.0.0.0/7", err: "wider than /8"},
		{in: "::ffff:128.0.0.0/97", err: "wider than /8"},
		{in: "::/0", err: "holds every IPv4 client"},
		{in: "::ffff:0:0/96", err: "wider than /8"}, // every IPv4 client of a dual-stack app
		{in: "::/80", err: "holds every IPv4 client"},
		{in: "::fffe:0:0/95", err: "holds every IPv4 client"},
		{in: "::/96", want: "::/96"}, // IPv4-compatible, not mapped
		{in: "10.0.0.0/33", err: "want a network"},
		{in: "fe80::1%eth0", err: "want a network"},
		{in: "example.com", err: "want a network"},
		{in: "", err: "want a network"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := parsePeer(tt.in)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("parsePeer(%q) = %v, %v; want an error with %q", tt.in, got, err, tt.err)
				}
				return
			}
			if err != nil || got.String() != tt.want {
				t.Fatalf("parsePeer(%q) = %v, %v; want %s", tt.in, got, err, tt.want)
			}
		})
	}
}

func TestExcludesPeer(t *testing.T) {
	ex := exclusions{peers: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("fd00::/8")}}
	for addr, want := range map[string]bool{
		"10.1.2.3":        true,
		"::ffff:10.1.2.3": true, // an IPv4 client of a dual-stack listener
		"fd12::1":         true,
		"11.0.0.1":        false,
		"::ffff:11.0.0.1": false,
		"fe80::1":         false,
		"::ffff:fd00:0:0": false,
		"2001:db8::a00:1": false,
	} {
		if got := ex.excludesPeer(netip.MustParseAddr(addr)); got != want {
			t.Errorf("excludesPeer(%s) = %v, want %v", addr, got, want)
		}
	}
}

// TestExclusionFlagsUsage: every mistake in the new flags is a one-line
// usage error (exit 2) that names the flag, in each mode that counts.
func TestExclusionFlagsUsage(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "fifo")
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"not a network", []string{"--ignore-peer", "scraper"}, `invalid value "scraper" for flag --ignore-peer`},
		{"host bits set", []string{"--ignore-peer", "10.1.2.3/8"}, "did you mean 10.0.0.0/8?"},
		{"everything", []string{"--ignore-peer", "0.0.0.0/0"}, "wider than /8"},
		{"half of IPv4", []string{"--ignore-peer", "0.0.0.0/1", "--ignore-peer", "128.0.0.0/1"}, "wider than /8"},
		{"every IPv4-mapped client", []string{"--ignore-peer", "::/80"}, "holds every IPv4 client"},
		{"idle below a second", []string{"--ignore-idle", "500ms"}, "want at least 1s"},
		{"idle from /proc", []string{"--ignore-idle", "30s", "--source", "proc"}, "--ignore-idle needs --source netlink or auto"},
		{"negative idle", []string{"--ignore-idle", "-1s"}, "must not be negative"},
	}
	for _, mode := range [][]string{{"count"}, {"stopper", "--fifo", fifo}, {"proxy", "--fifo", fifo}} {
		for _, tt := range tests {
			t.Run(mode[0]+"/"+tt.name, func(t *testing.T) {
				var stderr strings.Builder
				err := run(t.Context(), append(append([]string{}, mode...), tt.args...), &strings.Builder{}, &stderr)
				code := exitCode(err, &stderr)
				if code != 2 || !strings.Contains(stderr.String(), tt.want) || strings.Count(stderr.String(), "\n") != 1 {
					t.Fatalf("exit %d, stderr %q; want 2 and one line with %q", code, stderr.String(), tt.want)
				}
			})
		}
	}
}

func TestTooManyPeers(t *testing.T) {
	var l peerList
	for i := range maxPeers {
		if err := l.Set(netip.AddrFrom4([4]byte{10, 0, 0, byte(i)}).String()); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Set("10.0.1.0/24"); err == nil || !strings.Contains(err.Error(), "at most") {
		t.Fatalf("peer %d: %v; want an error", maxPeers+1, err)
	}
}

// peerExclusions leaves out the given networks.
func peerExclusions(networks ...string) exclusions {
	var ex exclusions
	for _, n := range networks {
		ex.peers = append(ex.peers, netip.MustParsePrefix(n))
	}
	return ex
}

// callsOf is src's count of calls, with ex left out.
func callsOf(src socketSource, ex exclusions) func(uint16) (int, error) {
	return func(port uint16) (int, error) {
		t, err := src.established(port, ex)
		return t.calls, err
	}
}
