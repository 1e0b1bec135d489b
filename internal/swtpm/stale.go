package swtpm

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Stale returns the pid of a swtpm that still serves i.Dir according to its
// pid file, or 0. It checks that the process really is a swtpm of this
// directory (pids are reused), so a daemon restarted after a crash may kill
// what it returns.
func Stale(i Instance) (int, error) {
	if dir, err := filepath.Abs(i.Dir); err == nil {
		i.Dir = dir
	}
	b, err := os.ReadFile(i.PIDFile())
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("reading swtpm pid file: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		return 0, nil // not swtpm's writing; nothing to find
	}
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return 0, nil // gone
	}
	args := bytes.Split(cmdline, []byte{0})
	if len(args) == 0 || !strings.HasPrefix(baseName(string(args[0])), "swtpm") {
		return 0, nil
	}
	for _, a := range args {
		if strings.HasPrefix(string(a), "dir="+i.Dir+",") || string(a) == "dir="+i.Dir {
			return pid, nil
		}
	}
	return 0, nil
}

// KillStale kills (SIGKILL) the swtpm Stale finds for i, if any, and reports
// its pid. The caller should not be running a Process for i.
func KillStale(i Instance) (int, error) {
	pid, err := Stale(i)
	if err != nil || pid == 0 {
		return 0, err
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return 0, fmt.Errorf("killing stale swtpm %d: %w", pid, err)
	}
	return pid, nil
}

func baseName(path string) string {
	if n := strings.LastIndexByte(path, '/'); n >= 0 {
		return path[n+1:]
	}
	return path
}

// Adopt takes back the swtpm serving i that an earlier vtpmd started with
// Keep, so that it is supervised and stopped like one started here; nil
// when none runs. Its exit is awaited through a pidfd (it is not this
// process's child), so how it ended is not known.
func Adopt(i Instance, log *slog.Logger) (*Process, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	i, err := i.check()
	if err != nil {
		return nil, fmt.Errorf("adopting swtpm: %w", err)
	}
	pid, err := Stale(i)
	if err != nil || pid == 0 {
		return nil, err
	}
	p := &Process{inst: i, pid: pid, log: log, out: newOutput(log.With("dir", i.Dir)), done: make(chan struct{})}
	if fi, err := os.Stat(i.logFile()); err == nil {
		p.out.from = fi.Size() // what earlier processes wrote is not this one's
	}
	go func() {
		awaitExit(pid)
		// Without pidfds awaitExit returns at once; a zombie lingers until
		// init reaps it. Either way, poll until the pid is gone.
		for syscall.Kill(pid, 0) == nil {
			time.Sleep(time.Second)
		}
		removePIDFile(i.PIDFile(), pid)
		p.err = fmt.Errorf("adopted swtpm %d exited", pid)
		close(p.done)
	}()
	log.Info("adopted swtpm left running by an earlier vtpmd", "dir", i.Dir, "pid", pid)
	return p, nil
}
