// procnet.go says what a count is (the calls, and what is left out as no
// call) and where counts come from: sock_diag (netlink.go) or the kernel's
// TCP tables, /proc/net/tcp and tcp6, which it reads.

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
func (p *procSource) established(port uint16, ex exclusions) (t tally, err error) {
	err = p.eachTable(func(r io.Reader) error {
		c, err := p.countEstablished(r, port, ex)
		t.calls, t.excludedPeer = t.calls+c.calls, t.excludedPeer+c.excludedPeer
		return err
	})
	if err != nil {
		return tally{}, err
	}
	return t, nil
}

func (p *procSource) listeners(port uint16) (inodes []uint64, err error) {
	err = p.eachTable(func(r io.Reader) error {
		inodes, err = p.listenInodes(r, port, inodes)
		return err
	})
	return inodes, err
}

// eachTable reads every table in turn; only tcp6 may be missing (a kernel without IPv6).
func (p *procSource) eachTable(fn func(r io.Reader) error) error {
	for i, path := range p.paths {
		f, err := os.Open(path)
		if i > 0 && errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		err = fn(f)
		f.Close()
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
	}
	return nil
}

// countEstablished tallies one table's ESTABLISHED rows whose local port is
// port: a loopback client in the pod has port as its remote, and is no call.
func (p *procSource) countEstablished(r io.Reader, port uint16, ex exclusions) (tally, error) {
	var t tally
	err := p.eachRow(r, port, func(row tableRow) {
		switch {
		case string(row.state) != stateEstablished:
		case len(ex.peers) > 0 && ex.excludesPeer(procAddr(row.remoteAddr)):
			t.excludedPeer++
		default:
			t.calls++
		}
	})
	if err != nil {
		return tally{}, err
	}
	return t, nil
}

func (p *procSource) listenInodes(r io.Reader, port uint16, inodes []uint64) ([]uint64, error) {
	err := p.eachRow(r, port, func(row tableRow) {
		if string(row.state) == stateListen {
			inodes = append(inodes, row.inode)
		}
	})
	return inodes, err
}

// tableRow is what wsdrain needs of a line; the slices alias the buffer.
type tableRow struct {
	remoteAddr, state []byte
	inode             uint64 // LISTEN rows only
}

// eachRow calls fn for every row on port. A line it cannot parse (or one cut
// short) fails the whole table: a damaged count is unknown, never zero.
func (p *procSource) eachRow(r io.Reader, port uint16, fn func(tableRow)) error {
	p.br.Reset(r)
	defer p.br.Reset(nil)
	want := hexPort(port)
	for lineNo := 1; ; lineNo++ {
		line, err := p.br.ReadSlice('\n')
		switch {
		case err == io.EOF && len(line) == 0 && lineNo > 1:
			return nil
		case errors.Is(err, bufio.ErrBufferFull):
			return fmt.Errorf("%w: line %d longer than %d bytes", errMalformed, lineNo, p.br.Size())
		case err == io.EOF:
			return fmt.Errorf("%w: line %d cut short: %q", errMalformed, lineNo, preview(line))
		case err != nil:
			return err
		}
		line = line[:len(line)-1]
		if lineNo == 1 {
			if !bytes.HasPrefix(bytes.TrimLeft(line, " "), []byte("sl ")) {
				return fmt.Errorf("%w: header %q", errMalformed, preview(line))
			}
			continue
		}
		row, localPort, ok := parseRow(line)
		if !ok {
			return fmt.Errorf("%w: line %d: %q", errMalformed, lineNo, preview(line))
		}
		if bytes.Equal(localPort, want[:]) {
			fn(row)
		}
	}
}

var errMalformed = errors.New("malformed table")

// parseRow splits "sl local rem st tx:rx tr:when retrnsmt uid timeout inode …"
// by runs of spaces, not by column: the sl column widens past 9999 rows.
func parseRow(line []byte) (row tableRow, localPort []byte, ok bool) {
	sl, rest := nextField(line)
	local, rest := nextField(rest)
	remote, rest := nextField(rest)
	state, rest := nextField(rest)
	_, okSl := number(bytes.TrimSuffix(sl, []byte(":")), 10)
	_, localPort, okLocal := splitAddrPort(local)
	remoteAddr, _, okRemote := splitAddrPort(remote)
	_, okState := number(state, 16)
	if !okSl || !bytes.HasSuffix(sl, []byte(":")) || !okLocal || !okRemote || !okState || len(state) != 2 {
		return tableRow{}, nil, false
	}
	row = tableRow{remoteAddr: remoteAddr, state: state}
	if string(state) != stateListen {
		return row, localPort, true
	}
	var inode []byte
	for range 6 {
		inode, rest = nextField(rest)
	}
	row.inode, ok = number(inode, 10)
	return row, localPort, ok && len(inode) <= 19
}

// splitAddrPort splits ADDR:PORT in hex: 8 address digits for IPv4, 32 for
// IPv6 (where an IPv4 client of a dual-stack listener shows as ::ffff:a.b.c.d).
func splitAddrPort(field []byte) (addr, port []byte, ok bool) {
	addrLen := len(field) - 5
	if addrLen != 8 && addrLen != 32 || field[addrLen] != ':' {
		return nil, nil, false
	}
	addr, port = field[:addrLen], field[addrLen+1:]
	_, okAddr := number(addr, 16)
	_, okPort := number(port, 16)
	return addr, port, okAddr && okPort
}

// procAddr decodes a checked address. The kernel prints each 32-bit word in
// host byte order; storing it back the same way gives network order.
func procAddr(hex []byte) netip.Addr {
	var b [16]byte
	for i := 0; i < len(hex)/8; i++ {
		word, _ := number(hex[8*i:8*i+8], 16)
		binary.NativeEndian.PutUint32(b[4*i:], uint32(word))
	}
	if len(hex) == 8 {
		return netip.AddrFrom4([4]byte(b[:4]))
	}
	return netip.AddrFrom16(b)
}

func nextField(s []byte) (field, rest []byte) {
	s = bytes.TrimLeft(s, " ")
	if i := bytes.IndexByte(s, ' '); i >= 0 {
		return s[:i], s[i:]
	}
	return s, nil
}

func hexPort(port uint16) [4]byte {
	const digits = "0123456789ABCDEF"
	return [4]byte{digits[port>>12], digits[port>>8&0xF], digits[port>>4&0xF], digits[port&0xF]}
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

func preview(b []byte) string {
	if len(b) > 80 {
		return string(b[:80]) + "…"
	}
	return string(b)
}
