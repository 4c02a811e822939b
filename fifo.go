// fifo.go is the drain pipe: a named pipe on an emptyDir through which the
// stopper (a preStop hook, whose output the kubelet throws away) tells the
// proxy to drain and tells the proxy's log what it does, and what the proxy
// does with each message, with the drain's state for a restarted proxy.
//
// The protocol is one message per line, each written in a single write(2)
// of at most PIPE_BUF bytes so that it arrives whole, and framed by a newline
// on both sides: the leading one ends whatever part of a line another writer
// left in the pipe, which could otherwise swallow the message. Empty lines
// mean nothing.
//
//	drain          start draining: readiness answers 503 from now on
//	done           the app was signalled; release the app's preStop (GET /drain)
//	log <line>     a log line of the stopper's, copied to the proxy's stdout
//
// Anything else is logged as ignored, at most once a second.

package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"
)

// maxMessage is PIPE_BUF: the largest write the kernel keeps in one piece.
const maxMessage = 4096

// ensureFIFO creates the pipe if nothing is at path.
func ensureFIFO(path string) error {
	if err := syscall.Mkfifo(path, 0o600); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("create fifo %s: %w", path, err)
	}
	return nil
}

// openFIFOReader opens the pipe read-write, so that open(2) does not wait
// for a writer and a writer's close gives no EOF. Whoever can write the pipe
// can drain the pod: it must be a pipe of our own that no one else may write,
// reached through no symlink.
func openFIFOReader(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, fmt.Errorf("open fifo: %w", err)
	}
	fi, err := f.Stat()
	if err == nil {
		err = checkOwn(fi, os.ModeNamedPipe)
	}
	if err != nil {
		f.Close()
		return nil, hintError{fmt.Errorf("fifo %s: %w", path, err),
			"point --fifo at a path on the sidecar's emptyDir, or remove what is there: the proxy creates the pipe itself"}
	}
	return f, nil
}

// readFIFO hands each message to handle until r fails (the proxy closes it
// on shutdown). A line longer than maxMessage is skipped to its end and handed
// over cut, not whole, so that garbage of any length cannot swallow a "drain".
func readFIFO(r io.Reader, handle func(msg []byte, whole bool)) error {
	br := bufio.NewReaderSize(r, maxMessage)
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			handle(line[:64], false)
			for errors.Is(err, bufio.ErrBufferFull) {
				_, err = br.ReadSlice('\n')
			}
		} else if err == nil && len(line) > 1 {
			handle(line[:len(line)-1], true)
		}
		if err != nil {
			return err
		}
	}
}

// pipeLinePrefix marks a line copied from the pipe, which anyone who can write
// the pipe may write, apart from the proxy's own ("time=...").
const pipeLinePrefix = "pipe: "

// pipeMessage is what the proxy does with each message of the pipe.
func (p *proxy) pipeMessage(out io.Writer) func(msg []byte, whole bool) {
	ignored := &quietLog{log: p.log.Warn, summary: "fifo: ignored more messages"}
	return func(msg []byte, whole bool) {
		switch {
		case !whole:
			ignored.event("count", "fifo: ignored message", "why", "line longer than 4096 bytes", "start", string(msg))
		case string(msg) == "drain":
			p.drainOnce.Do(func() {
				close(p.draining)
				p.updateState(func() { p.state.draining = true })
				p.log.Info("drain begun: readiness answers 503 from now on")
			})
		case string(msg) == "done":
			p.releaseOnce.Do(func() {
				close(p.released)
				p.updateState(func() { p.state.released = true })
				p.log.Info("stopper is done with the app")
			})
		case bytes.HasPrefix(msg, []byte("log ")) && printable(msg[4:]):
			fmt.Fprintf(out, "%s%s\n", pipeLinePrefix, msg[4:])
		default:
			ignored.event("count", "fifo: ignored message", "why", "unknown message", "start", string(msg[:min(len(msg), 64)]))
		}
	}
}

// resume takes on the drain state an earlier proxy of this pod left (one
// restarted while the pod terminates, KEP-4438): 503 from its first answer,
// and GET /drain held until the stopper is done.
func (p *proxy) resume(path string) {
	s, err := openDrainState(path)
	if err != nil {
		p.log.Warn("drain state kept in memory only: a restarted proxy forgets a drain", "err", err)
	}
	p.state = s
	if s.word != "" {
		p.drainOnce.Do(func() { close(p.draining) })
		p.log.Info("the pod is terminating (drain state of an earlier proxy): readiness answers 503")
	}
	if s.word == "done" {
		p.releaseOnce.Do(func() { close(p.released) })
		p.log.Info("the stopper was done with the app before this proxy started")
	}
}

func (p *proxy) updateState(change func()) {
	if err := p.state.update(change); err != nil {
		p.log.Warn("cannot write the drain state: a restarted proxy may forget the drain", "err", err)
	}
}

// printable reports whether b is UTF-8 text with no control characters, so
// that a copied line cannot forge other lines or drive a terminal.
func printable(b []byte) bool {
	for len(b) > 0 {
		r, size := utf8.DecodeRune(b)
		if r == utf8.RuneError || !unicode.IsPrint(r) {
			return false
		}
		b = b[size:]
	}
	return true
}

// fifoWriter is the stopper's end. It never blocks, as the stopper must go
// on counting: with no proxy reading or a full pipe a message is dropped
// with an error (the stopper retries "drain" and "done").
type fifoWriter struct {
	path string
	fd   int
}

func newFIFOWriter(path string) *fifoWriter { return &fifoWriter{path: path, fd: -1} }

// send writes msg between two newlines in one write, opening the pipe again
// if needed, so that a proxy that starts late gets later messages.
func (w *fifoWriter) send(msg string) error {
	if len(msg) > maxMessage-2 {
		msg = strings.ToValidUTF8(msg[:maxMessage-2], "")
	}
	if err := w.open(); err != nil {
		return err
	}
	_, err := syscall.Write(w.fd, []byte("\n"+msg+"\n"))
	if err == syscall.EPIPE {
		w.close()
	}
	if err == syscall.EAGAIN {
		return fmt.Errorf("fifo %s is full: the proxy is not reading", w.path)
	}
	if err != nil {
		return fmt.Errorf("write fifo %s: %w", w.path, err)
	}
	return nil
}

// Write sends one log line: a slog handler writes to the proxy through it.
func (w *fifoWriter) Write(p []byte) (int, error) {
	if err := w.send("log " + string(bytes.TrimSuffix(p, []byte("\n")))); err != nil {
		return 0, err
	}
	return len(p), nil
}

// open opens the pipe without waiting for a reader (ENXIO if there is none)
// and without following a symlink, which could lead the writes elsewhere.
func (w *fifoWriter) open() error {
	if w.fd >= 0 {
		return nil
	}
	fd, err := syscall.Open(w.path, syscall.O_WRONLY|syscall.O_NONBLOCK|syscall.O_CLOEXEC|syscall.O_NOFOLLOW, 0)
	switch {
	case err == syscall.ENXIO:
		return fmt.Errorf("fifo %s has no reader: is the proxy running?", w.path)
	case err == syscall.ELOOP:
		return fmt.Errorf("fifo %s is a symbolic link: refused", w.path)
	case err != nil:
		return fmt.Errorf("open fifo %s: %w", w.path, err)
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(fd, &st); err != nil || st.Mode&syscall.S_IFMT != syscall.S_IFIFO {
		syscall.Close(fd)
		return fmt.Errorf("fifo %s is not a named pipe", w.path)
	}
	w.fd = fd
	return nil
}

func (w *fifoWriter) close() {
	if w.fd >= 0 {
		syscall.Close(w.fd)
		w.fd = -1
	}
}

// quietLog logs an event in full only if none of its kind was logged in
// the last second; it counts the others and sums them up in one line a
// second, so that whoever can cause the events cannot flood the log. A
// second with nothing counted ends the quiet.
type quietLog struct {
	log     func(msg string, args ...any)
	summary string // the message of the line that sums up
	mu      sync.Mutex
	logged  map[string]bool // kinds logged in full since the quiet began; nil: not quiet
	counts  map[string]int  // events not logged, by kind
}

func (q *quietLog) event(kind, msg string, args ...any) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.logged[kind] {
		q.counts[kind]++
		return
	}
	q.log(msg, args...)
	if q.logged == nil {
		q.logged, q.counts = map[string]bool{}, map[string]int{}
		time.AfterFunc(time.Second, q.sumUp)
	}
	q.logged[kind] = true
}

func (q *quietLog) sumUp() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.counts) == 0 {
		q.logged = nil
		return
	}
	var args []any
	for _, kind := range slices.Sorted(maps.Keys(q.counts)) {
		args = append(args, kind, q.counts[kind])
	}
	q.log(q.summary, args...)
	clear(q.counts)
	time.AfterFunc(time.Second, q.sumUp)
}
