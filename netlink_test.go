//go:build linux

package main

import (
	"encoding/binary"
	"errors"
	"net"
	"slices"
	"strconv"
	"syscall"
	"testing"
)

// TestSourcesAgree opens live dual-stack connections in this network
// namespace and checks that netlink and /proc count them alike.
func TestSourcesAgree(t *testing.T) {
	nl, err := newNetlinkSource()
	if err != nil {
		t.Fatalf("netlink sock_diag refused in this namespace: %v", err)
	}
	defer nl.close()
	ln, err := net.Listen("tcp", ":0") // dual-stack, as Go, Node and Java servers are
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	for i, addr := range []string{"127.0.0.1", "127.0.0.1", "127.0.0.1", "::1", "::1"} {
		c, err := net.Dial("tcp", net.JoinHostPort(addr, strconv.Itoa(int(port))))
		if err != nil {
			t.Fatalf("client %d: %v", i, err)
		}
		defer c.Close()
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
	}
	proc := newProcSource()
	for name, src := range map[string]socketSource{"netlink": nl, "proc": proc} {
		if n, err := src.established(port); err != nil || n != 5 {
			t.Errorf("%s: established = %d, %v; want 5 (3 IPv4-mapped, 2 IPv6)", name, n, err)
		}
	}
	nlInodes, err1 := nl.listeners(port)
	procInodes, err2 := proc.listeners(port)
	if err1 != nil || err2 != nil || len(nlInodes) != 1 || !slices.Equal(nlInodes, procInodes) {
		t.Errorf("listener inodes: netlink %v (%v), proc %v (%v); want the same one", nlInodes, err1, procInodes, err2)
	}
}

// diagMessage builds one netlink message as the kernel sends it.
func diagMessage(typ uint16, seq uint32, body []byte) []byte {
	b := make([]byte, nlmsgHdrLen+len(body), nlmsgHdrLen+len(body)+3)
	binary.NativeEndian.PutUint32(b[0:], uint32(len(b)))
	binary.NativeEndian.PutUint16(b[4:], typ)
	binary.NativeEndian.PutUint32(b[8:], seq)
	copy(b[nlmsgHdrLen:], body)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func errBody(errno syscall.Errno) []byte {
	b := make([]byte, 20)
	binary.NativeEndian.PutUint32(b, uint32(-int32(errno)))
	return b
}

func TestParseDiagReply(t *testing.T) {
	sock := make([]byte, inetDiagMsgLen)
	cat := func(parts ...[]byte) []byte { return slices.Concat(parts...) }
	tests := []struct {
		name    string
		reply   []byte
		count   int
		done    bool
		wantErr error
	}{
		{"two sockets, more to come", cat(diagMessage(sockDiagByFamily, 7, sock), diagMessage(sockDiagByFamily, 7, sock)), 2, false, nil},
		{"sockets then done", cat(diagMessage(sockDiagByFamily, 7, sock), diagMessage(syscall.NLMSG_DONE, 7, make([]byte, 4))), 1, true, nil},
		{"a stale dump's messages are skipped", cat(diagMessage(sockDiagByFamily, 6, sock), diagMessage(syscall.NLMSG_DONE, 7, make([]byte, 4))), 0, true, nil},
		{"kernel error", diagMessage(syscall.NLMSG_ERROR, 7, errBody(syscall.EINVAL)), 0, true, syscall.EINVAL},
		{"dump interrupted", diagMessage(syscall.NLMSG_DONE, 7, errBody(syscall.EINTR)[:4]), 0, true, syscall.EINTR},
		{"short socket message", diagMessage(sockDiagByFamily, 7, sock[:40]), 0, true, errNetlinkMalformed},
		{"length past the end", diagMessage(sockDiagByFamily, 7, sock)[:50], 0, true, errNetlinkMalformed},
		{"cut header", []byte{1, 2, 3}, 0, true, errNetlinkMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := 0
			done, err := parseDiagReply(tt.reply, 7, func([]byte) { n++ })
			if n != tt.count || done != tt.done || !errors.Is(err, tt.wantErr) || (tt.wantErr == nil) != (err == nil) {
				t.Fatalf("got %d sockets, done %v, err %v; want %d, %v, %v", n, done, err, tt.count, tt.done, tt.wantErr)
			}
		})
	}
}
