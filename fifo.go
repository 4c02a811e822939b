// fifo.go is the drain pipe: a named pipe on an emptyDir through which the
// stopper (a preStop hook, whose output the kubelet throws away) tells the
// proxy to drain, and tells the proxy's log what it is doing.
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

// ensureFIFO creates the pipe if it is missing and refuses any other kind
// of file at path, so that a mistyped path never reads or truncates a file.
func ensureFIFO(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		if err := syscall.Mkfifo(path, 0o600); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("create fifo %s: %w", path, err)
		}
		fi, err = os.Lstat(path)
	}
	if err != nil {
		return fmt.Errorf("fifo: %w", err)
	}
	return checkOwnFIFO(path, fi)
}

// checkOwnFIFO refuses anything but a named pipe of our own that no other
// user may write: whoever can write it can drain the pod.
func checkOwnFIFO(path string, fi os.FileInfo) error {
	const hint = "point --fifo at a path on the sidecar's emptyDir, or remove what is there: the proxy creates the pipe itself"
	if fi.Mode()&os.ModeNamedPipe == 0 {
		return hintError{fmt.Errorf("fifo %s exists and is not a named pipe", path), hint}
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		return hintError{fmt.Errorf("fifo %s is owned by uid %d, not by this process's uid %d", path, st.Uid, os.Geteuid()), hint}
	}
	if fi.Mode().Perm()&0o022 != 0 {
		return hintError{fmt.Errorf("fifo %s is writable by group or others (mode %04o)", path, fi.Mode().Perm()), hint}
	}
	return nil
}

// openFIFOReader opens the pipe read-write. Opened read-only, open(2) would
// block until a writer appears and every writer's close would give EOF; as
// its own writer the proxy never blocks and never sees EOF. It does not
// follow a symlink, and checks again what it opened.
func openFIFOReader(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, fmt.Errorf("open fifo: %w", err)
	}
	fi, err := f.Stat()
	if err == nil {
		err = checkOwnFIFO(path, fi)
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// fifoEvents is what the proxy does with each kind of message.
type fifoEvents struct {
	drain      func()
	done       func()
	stopperLog func(line []byte)
	ignored    func(why string, preview []byte)
}

// readFIFO reads messages until r fails (the proxy closes it on shutdown).
// A line longer than maxMessage is skipped to its end, so garbage of any
// length cannot swallow a "drain" that follows it.
func readFIFO(r io.Reader, ev fifoEvents) error {
	br := bufio.NewReaderSize(r, maxMessage)
	for {
		line, err := br.ReadSlice('\n')
		switch {
		case errors.Is(err, bufio.ErrBufferFull):
			ev.ignored("line longer than 4096 bytes", line[:64])
			if err := skipLine(br); err != nil {
				return err
			}
		case err != nil:
			return err
		case len(line) > 1:
			dispatchMessage(bytes.TrimSuffix(line, []byte("\n")), ev)
		}
	}
}

func dispatchMessage(msg []byte, ev fifoEvents) {
	switch {
	case string(msg) == "drain":
		ev.drain()
	case string(msg) == "done":
		ev.done()
	case bytes.HasPrefix(msg, []byte("log ")) && printable(msg[4:]):
		ev.stopperLog(msg[4:])
	default:
		ev.ignored("unknown message", msg[:min(len(msg), 64)])
	}
}

// skipLine discards up to and including the next newline.
func skipLine(br *bufio.Reader) error {
	for {
		_, err := br.ReadSlice('\n')
		if !errors.Is(err, bufio.ErrBufferFull) {
			return err
		}
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

// fifoWriter is the stopper's end. It never blocks: with no proxy reading,
// no pipe at all or a full pipe, a message is dropped with an error, because
// the stopper must go on counting; it retries "drain" and "done" itself.
type fifoWriter struct {
	path string
	fd   int
}

func newFIFOWriter(path string) *fifoWriter { return &fifoWriter{path: path, fd: -1} }

// send writes msg between two newlines in one write. It reopens the pipe
// when needed, so a proxy that starts late still gets later messages.
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

// Write sends one log line; it lets a slog handler write to the proxy.
func (w *fifoWriter) Write(p []byte) (int, error) {
	if err := w.send("log " + string(bytes.TrimSuffix(p, []byte("\n")))); err != nil {
		return 0, err
	}
	return len(p), nil
}

// open opens the pipe write-only and non-blocking: that fails at once with
// ENXIO when no proxy has it open, instead of waiting for one. It does not
// follow a symlink, which could lead the writes to another pipe.
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
		return fmt.Errorf("open fifo: %w", &os.PathError{Op: "open", Path: w.path, Err: err})
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
