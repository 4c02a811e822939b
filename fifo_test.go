package main

import (
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// writeRaw writes to the proxy's pipe as any other writer could.
func writeRaw(t *testing.T, fifo, data string) {
	t.Helper()
	f, err := os.OpenFile(fifo, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(data); err != nil {
		t.Fatal(err)
	}
}

// ignoredCount is how many ignored messages the proxy's log reports,
// counting those it summed up rather than logged one by one.
func ignoredCount(log string) int {
	n := strings.Count(log, `msg="fifo: ignored message"`)
	for _, m := range regexp.MustCompile(`msg="fifo: ignored more messages" count=(\d+)`).FindAllStringSubmatch(log, -1) {
		k, _ := strconv.Atoi(m[1])
		n += k
	}
	return n
}

func TestFIFOFragmentDoesNotSwallowTheNextMessage(t *testing.T) {
	for name, fragment := range map[string]string{
		"short":               "dra",
		"longer than a write": strings.Repeat("x", 5000),
	} {
		t.Run(name, func(t *testing.T) {
			app := newFakeApp(t)
			p := startProxy(t, app.URL+"/healthz", filepath.Join(t.TempDir(), "drain.fifo"))
			writeRaw(t, p.fifo, fragment) // another writer's line, not ended
			p.send(t, "drain")
			waitFor(t, "the drain after a fragment", func() bool { return status(t, "GET", p.url+"/") == 503 })
		})
	}
}

func TestProxyMarksLinesCopiedFromThePipe(t *testing.T) {
	app := newFakeApp(t)
	p := startProxy(t, app.URL+"/healthz", filepath.Join(t.TempDir(), "drain.fifo"))
	forged := `time=2026-11-22T22:08:46.456Z level=INFO msg="stopper is done with the app"`
	writeRaw(t, p.fifo, "log "+forged+"\n")
	p.send(t, `log level=INFO msg="signalled app" pid=42 source=stopper`)
	waitFor(t, "the stopper's line in the log", func() bool {
		return strings.Contains(p.out.String(), "\n"+pipeLinePrefix+`level=INFO msg="signalled app" pid=42 source=stopper`+"\n")
	})
	for _, line := range strings.Split(strings.TrimSpace(p.out.String()), "\n") {
		if !strings.HasPrefix(line, "time=") && !strings.HasPrefix(line, pipeLinePrefix) {
			t.Errorf("a log line is neither the proxy's own nor marked as copied: %q", line)
		}
		if strings.HasPrefix(line, forged) {
			t.Errorf("a forged line looks like the proxy's own: %q", line)
		}
	}
}

func TestProxyLimitsIgnoredWarnings(t *testing.T) {
	app := newFakeApp(t)
	p := startProxy(t, app.URL+"/healthz", filepath.Join(t.TempDir(), "drain.fifo"))
	garbage := make([]byte, 300_000)
	rng := rand.New(rand.NewPCG(7, 7))
	for i := range garbage {
		garbage[i] = byte(rng.Uint32())
	}
	lines := 0 // non-empty ones: the proxy skips empty lines
	for _, l := range strings.Split(string(garbage), "\n") {
		if l != "" {
			lines++
		}
	}
	writeRaw(t, p.fifo, string(garbage)+"\n")
	p.send(t, "drain")
	waitFor(t, "the drain after the garbage", func() bool { return status(t, "GET", p.url+"/") == 503 })
	waitFor(t, "every ignored message to be reported", func() bool { return ignoredCount(p.out.String()) == lines })
	if n := strings.Count(p.out.String(), "level=WARN"); n > 5 {
		t.Errorf("300 KB of garbage (%d lines) gave %d warnings; want a handful", lines, n)
	}
}

func TestFIFOEndsDoNotFollowSymlinks(t *testing.T) {
	dir := t.TempDir()
	real, link := filepath.Join(dir, "real.fifo"), filepath.Join(dir, "drain.fifo")
	if err := syscall.Mkfifo(real, 0o600); err != nil {
		t.Fatal(err)
	}
	os.Symlink(real, link)
	reader, err := os.OpenFile(real, os.O_RDWR, 0) // so that a writer would succeed
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()
	if f, err := openFIFOReader(link); err == nil {
		f.Close()
		t.Error("the proxy's end opened a pipe through a symlink")
	}
	if err := newFIFOWriter(link).send("drain"); err == nil {
		t.Error("the stopper's end wrote a pipe through a symlink")
	}
}

func TestProxyRefusesAPipeThatIsNotItsOwn(t *testing.T) {
	tests := []struct {
		name  string
		mode  uint32
		owner int
		want  string
	}{
		{"writable by others", 0o622, -1, "writable by group or others"},
		{"writable by group", 0o620, -1, "writable by group or others"},
		{"another user's", 0o600, 65534, "owned by uid 65534"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.owner >= 0 && os.Geteuid() != 0 {
				t.Skip("needs root to give the pipe to another user")
			}
			path := filepath.Join(t.TempDir(), "drain.fifo")
			if err := syscall.Mkfifo(path, tt.mode); err != nil {
				t.Fatal(err)
			}
			os.Chmod(path, os.FileMode(tt.mode)) // past the umask
			if tt.owner >= 0 {
				os.Chown(path, tt.owner, tt.owner)
			}
			var out syncBuffer
			// Bounded, so that a proxy that accepts the pipe fails the test.
			ctx, cancel := context.WithTimeout(t.Context(), 3*time.Second)
			defer cancel()
			err := run(ctx, []string{"proxy", "--listen", freeAddr(t), "--fifo", path}, &out, &out)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v; want a refusal saying %q", err, tt.want)
			}
			var hinted hintError
			if !errors.As(err, &hinted) {
				t.Errorf("the refusal has no hint: %v", err)
			}
			reader, err := os.OpenFile(path, os.O_RDWR, 0) // so that only the check can refuse
			if err != nil {
				t.Fatal(err)
			}
			defer reader.Close()
			if err := newFIFOWriter(path).send("drain"); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("the stopper's end: err = %v; want a refusal saying %q", err, tt.want)
			}
		})
	}
}
