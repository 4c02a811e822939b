package main

// summary.go keeps every check as a row of the results file, and prints the
// rows of all runs as one table: a line per check, a column per Kubernetes
// version (and manifest, when there is more than one).

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
)

// row is one check of one run.
type row struct {
	label, manifest, scenario, check, verdict, figure string
}

// writeResults appends the run's rows, tab-separated, to the results file.
func (r *run) writeResults() error {
	if r.resultsFile == "" {
		return nil
	}
	f, err := os.OpenFile(r.resultsFile, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	for _, x := range r.rows {
		fields := []string{x.label, x.manifest, x.scenario, x.check, x.verdict, x.figure}
		for i, s := range fields {
			fields[i] = strings.NewReplacer("\t", " ", "\n", " ").Replace(s)
		}
		fmt.Fprintln(f, strings.Join(fields, "\t"))
	}
	return f.Close()
}

func readRows(path string) ([]row, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var rows []row
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		p := strings.Split(sc.Text(), "\t")
		if len(p) != 6 {
			return nil, fmt.Errorf("%s: not 6 tab-separated fields: %q", path, sc.Text())
		}
		rows = append(rows, row{p[0], p[1], p[2], p[3], p[4], p[5]})
	}
	return rows, sc.Err()
}

// printSummary prints the table; a failed check's cell starts with FAIL, a
// figure that only informs is in parentheses, a check a run did not reach
// shows "-".
func printSummary(path string, out io.Writer) error {
	rows, err := readRows(path)
	if err != nil {
		return err
	}
	manifests := map[string]bool{}
	for _, x := range rows {
		manifests[x.manifest] = true
	}
	column := func(x row) string {
		if len(manifests) > 1 {
			return x.label + " " + x.manifest
		}
		return x.label
	}
	var columns, lines []string
	cells := map[[2]string]string{}
	seen := map[string]bool{}
	passed, failed := 0, 0
	for _, x := range rows {
		col, line := column(x), x.scenario+"\t"+x.check
		if !seen["c"+col] {
			seen["c"+col] = true
			columns = append(columns, col)
		}
		if !seen["l"+line] {
			seen["l"+line] = true
			lines = append(lines, line)
		}
		cell := cut(x.figure, 36)
		switch x.verdict {
		case "PASS":
			passed++
		case "INFO": // a figure, not a check
			cell = "(" + cut(x.figure, 34) + ")"
		default:
			cell = "FAIL " + cell
			failed++
		}
		cells[[2]string{col, line}] = cell
	}
	fmt.Fprintf(out, "\n### summary: %d checks passed, %d failed\n", passed, failed)
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "scenario\tcheck\t%s\n", strings.Join(columns, "\t"))
	last := ""
	for _, line := range lines {
		scenario, check, _ := strings.Cut(line, "\t")
		if scenario == last {
			scenario = ""
		} else {
			last = scenario
		}
		fmt.Fprintf(tw, "%s\t%s", scenario, check)
		for _, col := range columns {
			cell, ok := cells[[2]string{col, line}]
			if !ok {
				cell = "-"
			}
			fmt.Fprintf(tw, "\t%s", cell)
		}
		fmt.Fprintln(tw)
	}
	return tw.Flush()
}

// cut shortens s to at most n runes.
func cut(s string, n int) string {
	if r := []rune(s); len(r) > n {
		return string(r[:n-1]) + "…"
	}
	return s
}
