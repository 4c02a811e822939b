// Wsapp is the e2e demo app: a dual-stack WebSocket echo server whose
// health endpoint shares the call port, like many voice bots. On SIGTERM it
// closes its calls with "going away" and exits 0, so an exit code of 137
// means the kubelet's SIGKILL, not a graceful stop.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/gorilla/websocket"
)

func main() {
	addr := flag.String("listen", ":8080", "address to serve /ws and /healthz on")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stdout, nil))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	// A pod's hostname is its name: the handshake tells the caller which pod
	// the Service chose (e2e "load").
	host, _ := os.Hostname()
	calls := &callSet{conns: map[*websocket.Conn]bool{}, answer: http.Header{"X-Pod": {host}}}
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok\n")) })
	// Like many apps, it serves its own metrics on the call port: a scraper
	// that keeps its connection open there is no call (e2e "scraper").
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "wsapp_calls %d\n", calls.count())
	})
	mux.HandleFunc("/ws", func(w http.ResponseWriter, r *http.Request) { calls.serve(w, r, log) })
	srv := &http.Server{Addr: *addr, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.ListenAndServe(); err != http.ErrServerClosed {
			log.Error("serve", "err", err)
			os.Exit(1)
		}
	}()
	log.Info("wsapp listening", "addr", *addr, "pid", os.Getpid())
	<-ctx.Done()
	log.Info("wsapp got SIGTERM", "open_calls", calls.count())
	calls.closeAll()
	shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	srv.Shutdown(shutdown)
	log.Info("wsapp exiting")
}

var upgrader = websocket.Upgrader{CheckOrigin: func(*http.Request) bool { return true }}

type callSet struct {
	mu     sync.Mutex
	conns  map[*websocket.Conn]bool
	answer http.Header // sent with every handshake's answer
}

// serve echoes every message until the client closes the call.
func (s *callSet) serve(w http.ResponseWriter, r *http.Request, log *slog.Logger) {
	c, err := upgrader.Upgrade(w, r, s.answer)
	if err != nil {
		return
	}
	s.mu.Lock()
	s.conns[c] = true
	s.mu.Unlock()
	log.Info("call started", "remote", r.RemoteAddr)
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		c.Close()
		log.Info("call ended", "remote", r.RemoteAddr)
	}()
	for {
		kind, msg, err := c.ReadMessage()
		if err != nil {
			return
		}
		s.mu.Lock()
		err = c.WriteMessage(kind, msg)
		s.mu.Unlock()
		if err != nil {
			return
		}
	}
}

func (s *callSet) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

func (s *callSet) closeAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		c.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseGoingAway, "server shutting down"), time.Now().Add(time.Second))
		c.Close()
	}
}
