// limit.go is the proxy's listener: it accepts every connection at once, so
// that the kernel's accept queue never fills (the kubelet's hook client has no
// dial timeout), and closes at once those over the limits.

package main

import (
	"net"
	"slices"
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
	open    map[string][]*limitedConn // by remote address
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
		lc := &limitedConn{Conn: c}
		lc.release = sync.OnceFunc(func() { l.remove(addr, lc) })
		ok, evicted := l.admit(addr, lc)
		if evicted != nil {
			evicted.Close()
			l.refused.event("evicted", "connection closed to make room for another address",
				"remote", evicted.RemoteAddr().String(), "for", addr)
		}
		if ok {
			return lc, nil
		}
		l.refused.event("refused", "connection closed at once: over the limit", "remote", addr,
			"per_address", maxConnsPerAddress, "total", maxConns)
		c.Close()
	}
}

// admit counts c from addr unless that passes a limit. When all are taken,
// the address holding the most gives one up to an address holding fewer, so
// that addresses sharing out maxConns cannot shut the node's kubelet out.
func (l *limitListener) admit(addr string, c *limitedConn) (ok bool, evicted *limitedConn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.open[addr]) >= maxConnsPerAddress {
		return false, nil
	}
	if l.n >= maxConns {
		most := ""
		for a, cs := range l.open {
			if len(cs) > len(l.open[most]) {
				most = a
			}
		}
		if len(l.open[most]) <= len(l.open[addr])+1 {
			return false, nil
		}
		evicted = l.open[most][len(l.open[most])-1]
		l.removeLocked(most, evicted)
	}
	l.open[addr] = append(l.open[addr], c)
	l.n++
	return true, evicted
}

func (l *limitListener) remove(addr string, c *limitedConn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.removeLocked(addr, c)
}

// removeLocked forgets c once: an evicted connection is forgotten before its Close.
func (l *limitListener) removeLocked(addr string, c *limitedConn) {
	i := slices.Index(l.open[addr], c)
	if i < 0 {
		return
	}
	l.n--
	if l.open[addr] = slices.Delete(l.open[addr], i, i+1); len(l.open[addr]) == 0 {
		delete(l.open, addr)
	}
}

type limitedConn struct {
	net.Conn
	release func()
}

func (c *limitedConn) Close() error {
	defer c.release()
	return c.Conn.Close()
}
