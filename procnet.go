// procnet.go says what a count is (calls, and what is left out) and where counts
// come from: sock_diag (netlink.go) or /proc/net/tcp and tcp6, which it reads.

package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"time"
)

// socketSource is where connection counts and listeners come from.
type socketSource interface {
	name() string
	established(port uint16, ex exclusions) (tally, error)
	listeners(port uint16) ([]uint64, error)
}

// errLinuxOnly: the package builds anywhere so that its portable tests run.
var errLinuxOnly = errors.New("wsdrain runs on Linux: it counts connections through netlink sock_diag or /proc/net/tcp")

// tally is one count of the app's port: the calls and, for the log, what was left out.
type tally struct{ calls, excludedPeer, excludedIdle int }

type exclusions struct {
	peers []netip.Prefix
	idle  time.Duration // 0: idleness excludes nothing
}

// excludesPeer: an IPv4 network also matches IPv4-mapped remotes (clients of a dual-stack listener).
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

// openSource opens the source c names; auto falls back to /proc, telling warn
// why, when the kernel or a sandbox (gVisor, seccomp) refuses netlink.
func openSource(c calls, warn func(msg string, err error)) (socketSource, error) {
	if runtime.GOOS != "linux" {
		return nil, errLinuxOnly
	}
	if c.source == "proc" {
		return newProcSource(), nil
	}
	nl, err := newNetlinkSource()
	switch {
	case err == nil:
		return nl, nil
	case c.source == "netlink":
		return nil, hintError{err, "--source netlink (which --ignore-idle needs) was refused here: use --source auto, without --ignore-idle"}
	}
	warn("netlink sock_diag unavailable; counting from /proc/net/tcp and tcp6", err)
	return newProcSource(), nil
}

type sourceFlag string

func (s *sourceFlag) String() string { return string(*s) }

func (s *sourceFlag) Set(v string) error {
	if v != "auto" && v != "netlink" && v != "proc" {
		return errors.New("want auto, netlink or proc")
	}
	*s = sourceFlag(v)
	return nil
}

// Socket states as the tables print them (include/net/tcp_states.h, in hex).
const (
	stateEstablished = "01"
	stateListen      = "0A"
)

var procTables = []string{"/proc/net/tcp", "/proc/net/tcp6"}

// procSource reads the tables through one reusable buffer: no line may cost
// an allocation, as the stopper counts often on pods with many connections.
type procSource struct {
	paths []string
	br    *bufio.Reader
}

func newProcSource(paths ...string) *procSource {
	if len(paths) == 0 {
		paths = procTables
	}
	return &procSource{paths: paths, br: bufio.NewReaderSize(nil, 64<<10)}
}

func (p *procSource) name() string { return "proc" }

// established cannot see idleness: callFlags.calls never picks /proc with --ignore-idle.
func (p *procSource) established(port uint16, ex exclusions) (tally, error) {
	s, err := p.scan(port, ex)
	return s.tally, err
}

func (p *procSource) listeners(port uint16) ([]uint64, error) {
	s, err := p.scan(port, exclusions{})
	return s.listeners, err
}

// portScan is what the tables hold on a port: its calls and its listeners.
type portScan struct {
	tally
	listeners []uint64
}

// scan reads every table in turn; only tcp6 may be missing (a kernel without IPv6).
func (p *procSource) scan(port uint16, ex exclusions) (s portScan, err error) {
	for i, path := range p.paths {
		f, err := os.Open(path)
		if i > 0 && errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return portScan{}, err
		}
		s, err = p.readTable(s, f, port, ex)
		f.Close()
		if err != nil {
			return portScan{}, fmt.Errorf("%s: %w", path, err)
		}
	}
	return s, nil
}

// readTable adds to s the rows of r whose local port is port: a loopback
// client in the pod has port as its remote, and is no call. A line it cannot
// parse (or one cut short) fails the whole table: a damaged count is unknown.
func (p *procSource) readTable(s portScan, r io.Reader, port uint16, ex exclusions) (portScan, error) {
	p.br.Reset(r)
	defer p.br.Reset(nil)
	for lineNo := 1; ; lineNo++ {
		line, err := p.br.ReadSlice('\n')
		switch {
		case err == io.EOF && len(line) == 0 && lineNo > 1:
			return s, nil
		case errors.Is(err, bufio.ErrBufferFull):
			return portScan{}, fmt.Errorf("%w: line %d longer than %d bytes", errMalformed, lineNo, p.br.Size())
		case err == io.EOF:
			return portScan{}, fmt.Errorf("%w: line %d cut short: %.80q", errMalformed, lineNo, line)
		case err != nil:
			return portScan{}, err
		case lineNo == 1 && !bytes.HasPrefix(bytes.TrimLeft(line, " "), []byte("sl ")):
			return portScan{}, fmt.Errorf("%w: header %.80q", errMalformed, line[:len(line)-1])
		case lineNo == 1:
			continue
		}
		line = line[:len(line)-1]
		localPort, remote, state, inode, ok := parseRow(line)
		switch {
		case !ok:
			return portScan{}, fmt.Errorf("%w: line %d: %.80q", errMalformed, lineNo, line)
		case localPort != uint64(port):
		case string(state) == stateListen:
			s.listeners = append(s.listeners, inode)
		case string(state) != stateEstablished:
		case len(ex.peers) > 0 && ex.excludesPeer(procAddr(remote)):
			s.excludedPeer++
		default:
			s.calls++
		}
	}
}

var errMalformed = errors.New("malformed table")

// parseRow splits "sl local rem st tx:rx tr:when retrnsmt uid timeout inode …"
// by runs of spaces, not by column: the sl column widens past 9999 rows. The
// slices alias line; inode is read on LISTEN rows only.
func parseRow(line []byte) (localPort uint64, remote, state []byte, inode uint64, ok bool) {
	sl, rest := nextField(line)
	local, rest := nextField(rest)
	remoteField, rest := nextField(rest)
	state, rest = nextField(rest)
	_, okSl := number(bytes.TrimSuffix(sl, []byte(":")), 10)
	_, localPort, okLocal := splitAddrPort(local)
	remote, _, okRemote := splitAddrPort(remoteField)
	_, okState := number(state, 16)
	if !okSl || !bytes.HasSuffix(sl, []byte(":")) || !okLocal || !okRemote || !okState || len(state) != 2 {
		return 0, nil, nil, 0, false
	}
	if string(state) != stateListen {
		return localPort, remote, state, 0, true
	}
	var field []byte
	for range 6 {
		field, rest = nextField(rest)
	}
	inode, ok = number(field, 10)
	return localPort, remote, state, inode, ok && len(field) <= 19
}

// splitAddrPort splits ADDR:PORT in hex: 8 address digits for IPv4, 32 for
// IPv6 (where an IPv4 client of a dual-stack listener shows as ::ffff:a.b.c.d).
func splitAddrPort(field []byte) (addr []byte, port uint64, ok bool) {
	addrLen := len(field) - 5
	if addrLen != 8 && addrLen != 32 || field[addrLen] != ':' {
		return nil, 0, false
	}
	_, okAddr := number(field[:addrLen], 16)
	port, okPort := number(field[addrLen+1:], 16)
	return field[:addrLen], port, okAddr && okPort
}

// procAddr decodes a checked address. The kernel prints each 32-bit word in
// host byte order; storing it back the same way gives network order.
func procAddr(hex []byte) netip.Addr {
	var b [16]byte
	for i := 0; i < len(hex)/8; i++ {
		word, _ := number(hex[8*i:8*i+8], 16)
		binary.NativeEndian.PutUint32(b[4*i:], uint32(word))
	}
	addr, _ := netip.AddrFromSlice(b[:len(hex)/2])
	return addr
}

func nextField(s []byte) (field, rest []byte) {
	s = bytes.TrimLeft(s, " ")
	if i := bytes.IndexByte(s, ' '); i >= 0 {
		return s[:i], s[i:]
	}
	return s, nil
}

// number reads b as digits of base 10 or 16 (upper case, as the kernel
// prints them); ok is false for anything else, or for nothing.
func number(b []byte, base uint64) (n uint64, ok bool) {
	for _, c := range b {
		d := base
		switch {
		case '0' <= c && c <= '9':
			d = uint64(c - '0')
		case 'A' <= c && c <= 'F':
			d = uint64(c-'A') + 10
		}
		if d >= base {
			return 0, false
		}
		n = n*base + d
	}
	return n, len(b) > 0
}
