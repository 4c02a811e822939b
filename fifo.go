// fifo.go is the drain pipe on the sidecar's emptyDir: the stopper (a preStop
// hook, whose output the kubelet throws away) writes, and the proxy acts on
// each message. A message is a line sent in one write(2) of at most PIPE_BUF
// bytes, so that it arrives whole, after a newline that ends any part of a
// line another writer left, which could otherwise swallow it:
//
//	drain          start draining: readiness answers 503 from now on
//	done           the app was signalled; release the app's preStop (GET /drain)
//	log <line>     a log line of the stopper's, copied to the proxy's stdout
//
// Empty lines mean nothing; others are logged as ignored, at most once a second.

package main

import (
	"bufio"
	"bytes"
	"cmp"
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

// openFIFOReader creates the pipe if nothing is at path and opens it
// read-write, so that open(2) does not wait for a writer and a writer's close
// gives no EOF. Whoever can write the pipe can drain the pod: it must be ours.
func openFIFOReader(path string) (*os.File, error) {
	if err := syscall.Mkfifo(path, 0o600); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, fmt.Errorf("fifo: create %s: %w", path, err)
	}
	f, err := openOwn(path, os.O_RDWR, os.ModeNamedPipe)
	if err != nil {
		return nil, hintError{fmt.Errorf("fifo: %w", err),
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

// printable reports whether b is UTF-8 text with no control characters, so
// that a copied line cannot forge other lines or drive a terminal.
func printable(b []byte) bool {
	return !bytes.ContainsFunc(b, func(r rune) bool { return r == utf8.RuneError || !unicode.IsPrint(r) })
}

// fifoWriter is the stopper's end. It never holds up the counting: with no
// proxy reading or a full pipe, a message fails (the stopper retries).
type fifoWriter struct {
	path string
	mu   sync.Mutex // the events' goroutine may log too
	f    *os.File   // nil: not open
}

func newFIFOWriter(path string) *fifoWriter { return &fifoWriter{path: path} }

// send writes msg between two newlines in one write, opening the pipe again
// if needed, so that a proxy that starts late gets later messages.
func (w *fifoWriter) send(msg string) error {
	if len(msg) > maxMessage-2 {
		msg = strings.ToValidUTF8(msg[:maxMessage-2], "")
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.f == nil {
		// Without waiting for a reader: ENXIO if there is none.
		f, err := openOwn(w.path, os.O_WRONLY|syscall.O_NONBLOCK, os.ModeNamedPipe)
		if errors.Is(err, syscall.ENXIO) {
			return fmt.Errorf("fifo: %s has no reader: is the proxy running?", w.path)
		}
		if err != nil {
			return fmt.Errorf("fifo: %w", err)
		}
		w.f = f
	}
	// One write(2), never waiting for room as os.File's Write would.
	var err error
	raw, rawErr := w.f.SyscallConn()
	if rawErr == nil {
		rawErr = raw.Write(func(fd uintptr) bool {
			_, err = syscall.Write(int(fd), []byte("\n"+msg+"\n"))
			return true
		})
	}
	switch err = cmp.Or(rawErr, err); {
	case err == syscall.EAGAIN:
		return fmt.Errorf("fifo: %s is full: the proxy is not reading", w.path)
	case err != nil:
		w.f.Close() // EPIPE: the proxy is gone; the next message opens the pipe again
		w.f = nil
		return fmt.Errorf("fifo: write %s: %w", w.path, err)
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

func (w *fifoWriter) close() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.f.Close() // nil-safe
	w.f = nil
}

// quietLog logs an event in full only if none of its kind was in the last
// second, and sums the others up once a second: no one can flood the log.
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
