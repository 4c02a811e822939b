package main

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// The testdata tables are captures of a real kernel's /proc/net/tcp and tcp6
// in a network namespace holding: a dual-stack listener on 8080 with an IPv4
// client (listed in tcp6 as ::ffff:127.0.0.1), an IPv6 client, a TIME_WAIT
// and a CLOSE_WAIT; an IPv4 listener on 9090 with one client. Both ends of
// every loopback connection are listed.

func TestCountEstablished(t *testing.T) {
	tests := []struct {
		name  string
		file  string
		port  uint16
		want  int
		fails bool
	}{
		{name: "dual-stack listener: IPv4-mapped and IPv6 clients", file: "tcp6", port: 8080, want: 2},
		{name: "IPv4 table holds only the client end for 8080", file: "tcp", port: 8080, want: 0},
		{name: "IPv4 server end counted, client end not", file: "tcp", port: 9090, want: 1},
		{name: "ephemeral port of a client end is its local port", file: "tcp", port: 0xBEF4, want: 1},
		{name: "no socket on the port", file: "tcp6", port: 443, want: 0},
		{name: "sl column widened past 9999", file: "tcp-sl10000", port: 9090, want: 15},
		{name: "header only", file: "tcp-header-only", port: 8080, want: 0},
		{name: "truncated last line is unknown, not a count", file: "tcp-truncated", port: 9090, fails: true},
		{name: "garbage line is unknown, not a count", file: "tcp6-garbage", port: 8080, fails: true},
		{name: "empty file", file: "", port: 8080, fails: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tl, err := newProcSource().readTable(portScan{}, openTestdata(t, tt.file), tt.port, exclusions{})
			got := tl.calls
			if tt.fails {
				if err == nil {
					t.Fatalf("count = %d, nil error; want an error", got)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("count = %d, %v; want %d", got, err, tt.want)
			}
		})
	}
}

func TestListenInodes(t *testing.T) {
	p := newProcSource()
	got, err := p.readTable(portScan{}, openTestdata(t, "tcp6"), 8080, exclusions{})
	if err != nil || !slices.Equal(got.listeners, []uint64{34319}) {
		t.Fatalf("tcp6 listeners on 8080 = %v, %v; want [34319]", got, err)
	}
	got, err = p.readTable(portScan{}, openTestdata(t, "tcp"), 8080, exclusions{})
	if err != nil || len(got.listeners) != 0 {
		t.Fatalf("tcp listeners on 8080 = %v, %v; want none (the client end is not a listener)", got, err)
	}
}

func TestProcSourceReadsBothTables(t *testing.T) {
	dir := t.TempDir()
	copyTestdata(t, "tcp", filepath.Join(dir, "tcp"))
	copyTestdata(t, "tcp6", filepath.Join(dir, "tcp6"))
	src := newProcSource(filepath.Join(dir, "tcp"), filepath.Join(dir, "tcp6"))
	if n, err := callsOf(src, exclusions{})(8080); err != nil || n != 2 {
		t.Errorf("established(8080) over tcp and tcp6 = %d, %v; want 2", n, err)
	}
	if n, err := callsOf(src, exclusions{})(9090); err != nil || n != 1 {
		t.Errorf("established(9090) over tcp and tcp6 = %d, %v; want 1", n, err)
	}

	noV6 := newProcSource(filepath.Join(dir, "tcp"), filepath.Join(dir, "missing-tcp6"))
	if n, err := callsOf(noV6, exclusions{})(9090); err != nil || n != 1 {
		t.Errorf("with no tcp6 table: established(9090) = %d, %v; want 1", n, err)
	}
	noV4 := newProcSource(filepath.Join(dir, "missing-tcp"), filepath.Join(dir, "tcp6"))
	if n, err := callsOf(noV4, exclusions{})(8080); err == nil {
		t.Errorf("with no tcp table: established = %d, nil error; want an error", n)
	}
	copyTestdata(t, "tcp6-garbage", filepath.Join(dir, "tcp6"))
	if n, err := callsOf(src, exclusions{})(8080); err == nil {
		t.Errorf("with a damaged tcp6: established = %d, nil error; want an error", n)
	}
}

// fuzzPeers makes the fuzzer decode remote addresses too.
var fuzzPeers = exclusions{peers: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}}

// FuzzParseTable feeds arbitrary tables to the parser: it must never panic,
// and a count it reports can be no larger than the rows it was given.
func FuzzParseTable(f *testing.F) {
	for _, name := range []string{"tcp", "tcp6", "tcp-sl10000", "tcp-truncated", "tcp6-garbage"} {
		b, err := os.ReadFile(filepath.Join("testdata", name))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, uint16(8080))
	}
	p := newProcSource()
	f.Fuzz(func(t *testing.T, table []byte, port uint16) {
		s, err := p.readTable(portScan{}, strings.NewReader(string(table)), port, fuzzPeers)
		n := s.calls + s.excludedPeer + len(s.listeners)
		if err == nil && n > strings.Count(string(table), "\n") {
			t.Fatalf("count %d exceeds the %d lines given", n, strings.Count(string(table), "\n"))
		}
		if err != nil && n != 0 {
			t.Fatalf("a failed count returned %d", n)
		}
	})
}

func openTestdata(t *testing.T, name string) *strings.Reader {
	t.Helper()
	if name == "" {
		return strings.NewReader("")
	}
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return strings.NewReader(string(b))
}

func copyTestdata(t *testing.T, name, to string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// The -peers captures hold, in a network namespace: a dual-stack listener
// on 8080 with IPv4 clients from 127.0.0.2 (two) and 127.0.0.3, listed in
// tcp6 as IPv4-mapped, and one IPv6 client from ::1; an IPv4 listener on
// 9090 with clients from 127.0.0.2 and 127.0.0.3.
func TestCountEstablishedLeavesOutPeers(t *testing.T) {
	tests := []struct {
		name string
		file string
		port uint16
		ex   exclusions
		want tally
	}{
		{"no exclusion", "tcp6-peers", 8080, exclusions{}, tally{calls: 4}},
		{"an IPv4 host matches its mapped remote", "tcp6-peers", 8080, peerExclusions("127.0.0.3/32"), tally{calls: 3, excludedPeer: 1}},
		{"an IPv4 network", "tcp6-peers", 8080, peerExclusions("127.0.0.2/31"), tally{calls: 1, excludedPeer: 3}},
		{"an IPv6 host", "tcp6-peers", 8080, peerExclusions("::1/128"), tally{calls: 3, excludedPeer: 1}},
		{"the mapped network written as IPv6", "tcp6-peers", 8080, peerExclusions("::ffff:127.0.0.2/128"), tally{calls: 2, excludedPeer: 2}},
		{"an IPv6 network never matches IPv4 rows", "tcp-peers", 9090, peerExclusions("::/1"), tally{calls: 2}},
		{"IPv4 table", "tcp-peers", 9090, peerExclusions("127.0.0.3/32"), tally{calls: 1, excludedPeer: 1}},
		{"client ends are not counted, excluded or not", "tcp-peers", 8080, peerExclusions("127.0.0.1/32"), tally{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := newProcSource().readTable(portScan{}, openTestdata(t, tt.file), tt.port, tt.ex)
			if err != nil || got.tally != tt.want {
				t.Fatalf("%+v, %v; want %+v", got.tally, err, tt.want)
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

func peerExclusions(networks ...string) exclusions {
	var ex exclusions
	for _, n := range networks {
		ex.peers = append(ex.peers, netip.MustParsePrefix(n))
	}
	return ex
}

func callsOf(src socketSource, ex exclusions) func(uint16) (int, error) {
	return func(port uint16) (int, error) {
		t, err := src.established(port, ex)
		return t.calls, err
	}
}
