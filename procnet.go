// procnet.go is where counts come from: it picks sock_diag (netlink.go) or
// the kernel's TCP tables, /proc/net/tcp and tcp6, and reads the tables.

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
)

// socketSource is where connection counts and listeners come from.
type socketSource interface {
	name() string
	established(port uint16, ex exclusions) (tally, error)
	listeners(port uint16) ([]uint64, error)
}

// errLinuxOnly is what counting answers elsewhere: the package builds on
// any system so that its portable tests run on a developer's machine.
var errLinuxOnly = errors.New("wsdrain runs on Linux: it counts connections through netlink sock_diag or /proc/net/tcp")

// openSource opens the source c names; auto is netlink unless the kernel or
// a sandbox (gVisor, a seccomp profile) refuses it, and then warn is told
// why /proc is used instead.
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

// sourceFlag is --source: auto, netlink or proc.
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

// procTables are read in this order; a kernel built without IPv6 has no tcp6.
var procTables = []string{"/proc/net/tcp", "/proc/net/tcp6"}

// procSource reads the tables through one reusable buffer: the stopper
// counts every second on pods with tens of thousands of connections, so no
// line may cost an allocation.
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

// established counts ESTABLISHED sockets whose local port is port, leaving
// out the peers in ex. Idleness it cannot see: callFlags.calls never picks
// /proc with --ignore-idle.
func (p *procSource) established(port uint16, ex exclusions) (tally, error) {
	var t tally
	err := p.eachTable(func(r io.Reader) error {
		c, err := p.countEstablished(r, port, ex)
		t.calls, t.excludedPeer = t.calls+c.calls, t.excludedPeer+c.excludedPeer
		return err
	})
	if err != nil {
		return tally{}, err
	}
	return t, nil
}

// listeners returns the inodes of LISTEN sockets on port.
func (p *procSource) listeners(port uint16) (inodes []uint64, err error) {
	err = p.eachTable(func(r io.Reader) error {
		inodes, err = p.listenInodes(r, port, inodes)
		return err
	})
	return inodes, err
}

// eachTable reads every table in turn; only tcp6 may be missing.
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

// countEstablished tallies the ESTABLISHED rows of one table on port. Only
// the local side counts: inside the pod both ends of a loopback connection
// are listed, and the client end has port as its remote.
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

// listenInodes appends the inodes of one table's LISTEN rows on port.
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
	remoteAddr []byte // hex, as procAddr reads it
	state      []byte
	inode      uint64 // LISTEN rows only
}

// eachRow checks the header and calls fn for every row on port. Any line it
// cannot parse fails the whole table: a count read from a damaged table must
// be "unknown", never a number that could be zero. A last line with no
// newline was cut short, which the kernel never does.
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
// by runs of spaces, not by column: the sl column widens past 9999 rows. A
// LISTEN row is read on to its inode, the tenth field.
func parseRow(line []byte) (row tableRow, localPort []byte, ok bool) {
	sl, rest := nextField(line)
	local, rest := nextField(rest)
	remote, rest := nextField(rest)
	state, rest := nextField(rest)
	if _, ok := number(bytes.TrimSuffix(sl, []byte(":")), 10); !ok || !bytes.HasSuffix(sl, []byte(":")) {
		return tableRow{}, nil, false
	}
	_, localPort, ok1 := splitAddrPort(local)
	remoteAddr, _, ok2 := splitAddrPort(remote)
	if _, ok3 := number(state, 16); !ok1 || !ok2 || !ok3 || len(state) != 2 {
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
	_, okAddr := number(field[:addrLen], 16)
	_, okPort := number(field[addrLen+1:], 16)
	if !okAddr || !okPort {
		return nil, nil, false
	}
	return field[:addrLen], field[addrLen+1:], true
}

// procAddr decodes an address that splitAddrPort checked. The kernel prints
// each 32-bit word of it as a number in host byte order, so each word goes
// back into memory the same way to give the bytes in network order.
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

// nextField returns the first space-separated field of s and what follows it.
func nextField(s []byte) (field, rest []byte) {
	i := 0
	for i < len(s) && s[i] == ' ' {
		i++
	}
	j := i
	for j < len(s) && s[j] != ' ' {
		j++
	}
	return s[i:j], s[j:]
}

// hexPort is port as the tables print it: four upper-case hex digits.
func hexPort(port uint16) [4]byte {
	const digits = "0123456789ABCDEF"
	return [4]byte{digits[port>>12], digits[port>>8&0xF], digits[port>>4&0xF], digits[port&0xF]}
}

// number reads b as digits of base 10 or 16, upper case as the kernel prints
// them; ok is false for anything else, or for nothing.
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

// preview shortens a bad line for an error message.
func preview(b []byte) string {
	if len(b) > 80 {
		return string(b[:80]) + "…"
	}
	return string(b)
}
