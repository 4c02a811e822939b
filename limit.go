// limit.go is the proxy's listener: it accepts every connection at once, so
// that the kernel's accept queue never fills (the kubelet's hook client has no
// dial timeout), and closes at once those over the limits.

package main

import (
	"net"
	"sync"
)

// The connection limits bound the proxy's memory (BENCHMARKS.md); one address
// cannot take the room the kubelet's probes and hooks need.
const (
	maxConns           = 256
	maxConnsPerAddress = 32
)

type limitListener struct {
	net.Listener
	mu      sync.Mutex
	open    map[string]int // open connections by remote address
	n       int
	refused *quietLog
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		addr, _, _ := net.SplitHostPort(c.RemoteAddr().String())
		if l.add(addr, 1) {
			return &limitedConn{Conn: c, release: sync.OnceFunc(func() { l.add(addr, -1) })}, nil
		}
		l.refused.event("refused", "connection closed at once: over the limit", "remote", addr,
			"per_address", maxConnsPerAddress, "total", maxConns)
		c.Close()
	}
}

// add counts delta connections from addr, unless that passes a limit.
func (l *limitListener) add(addr string, delta int) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if delta > 0 && (l.n >= maxConns || l.open[addr] >= maxConnsPerAddress) {
		return false
	}
	l.n += delta
	if l.open[addr] += delta; l.open[addr] == 0 {
		delete(l.open, addr)
	}
	return true
}

type limitedConn struct {
	net.Conn
	release func()
}

func (c *limitedConn) Close() error {
	defer c.release()
	return c.Conn.Close()
}
