// chart-render: `helm template` for larder's chart, without helm (which Debian does not
// package). It is built from the libraries helm 3's engine (helm.sh/helm/v3/pkg/engine) renders
// with: Go's text/template, sprig v3's function map and sigs.k8s.io/yaml, so a template
// renders here as it does under helm. What it reproduces of helm is said where it is done;
// what larder's chart does not use (subcharts, hooks, lookup against a cluster, tpl, toToml,
// schema validation) is left out, and a template using it fails to render here.
//
// Usage: chart-render CHART_DIR [-f values.yaml]... [--set key=value]...
// [--name RELEASE] [--namespace NS].
// Output: "---\n# Source: <chart>/templates/<file>\n<document>\n" per document, as helm
// template prints it (ordered by file name rather than by kind). On a render error: helm's
// message after "Error: " on stderr, exit status 1.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	"sigs.k8s.io/yaml"
)

// Metadata: the Chart.yaml fields templates read as .Chart.<Field> (helm's chart.Metadata).
type Metadata struct {
	Name        string `json:"name,omitempty"`
	Version     string `json:"version,omitempty"`
	Description string `json:"description,omitempty"`
	APIVersion  string `json:"apiVersion,omitempty"`
	AppVersion  string `json:"appVersion,omitempty"`
	Type        string `json:"type,omitempty"`
}

// Files: the chart's files outside templates/, as .Files (helm's engine.files).
type Files map[string][]byte

func (f Files) Get(name string) string      { return string(f[name]) }
func (f Files) GetBytes(name string) []byte { return f[name] }

// Capabilities: helm template's defaults when no cluster is asked (chartutil.DefaultCapabilities).
type Capabilities struct {
	KubeVersion map[string]string
	APIVersions []string
	HelmVersion map[string]string
}

// helm's toYaml/toJson (pkg/engine/funcs.go): errors become an empty string.
func toYAML(v interface{}) string {
	data, err := yaml.Marshal(v)
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(string(data), "\n")
}

func toJSON(v interface{}) string {
	data, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	return string(data)
}

// required's message travels inside the template error between these markers; helm prints
// only the message (engine.cleanupExecError).
const warnStart, warnEnd = "HELM_ERR_START", "HELM_ERR_END"

var warnRegex = regexp.MustCompile(warnStart + `(.*)` + warnEnd)

// funcMap: sprig's TxtFuncMap without env/expandenv (helm removes them) plus helm's own
// functions; include is bound to the template set it runs in.
func funcMap(t *template.Template) template.FuncMap {
	f := sprig.TxtFuncMap()
	delete(f, "env")
	delete(f, "expandenv")
	f["toYaml"] = toYAML
	f["toJson"] = toJSON
	depth := map[string]int{}
	f["include"] = func(name string, data interface{}) (string, error) {
		if depth[name] > 1000 { // helm's recursion limit
			return "", fmt.Errorf("rendering template has a nested reference name: %s", name)
		}
		depth[name]++
		defer func() { depth[name]-- }()
		var buf strings.Builder
		err := t.ExecuteTemplate(&buf, name, data)
		return buf.String(), err
	}
	f["required"] = func(warn string, val interface{}) (interface{}, error) {
		if s, ok := val.(string); val == nil || (ok && s == "") {
			return val, errors.New(warnStart + warn + warnEnd)
		}
		return val, nil
	}
	return f
}

// render: every template parsed into one set (so include sees every define), then each file
// not starting with "_" executed with missingkey=zero and "<no value>" removed, as helm's
// non-strict engine does. Files go in helm's order (deepest path first, then reverse
// alphabetical), so the first failing template, which the error names, is helm's.
func render(templates map[string]string, top map[string]interface{}) (map[string]string, error) {
	t := template.New("gotpl").Option("missingkey=zero")
	t.Funcs(funcMap(t))
	names := make([]string, 0, len(templates))
	for name := range templates {
		names = append(names, name)
	}
	sort.Slice(names, func(i, j int) bool {
		a, b := names[i], names[j]
		if da, db := strings.Count(a, "/"), strings.Count(b, "/"); da != db {
			return da > db
		}
		return a > b
	})
	for _, name := range names {
		if _, err := t.New(name).Parse(templates[name]); err != nil {
			return nil, err
		}
	}
	out := map[string]string{}
	for _, name := range names {
		if strings.HasPrefix(path.Base(name), "_") {
			continue
		}
		top["Template"] = map[string]interface{}{"Name": name, "BasePath": path.Dir(name)}
		var buf strings.Builder
		if err := t.ExecuteTemplate(&buf, name, top); err != nil {
			return nil, cleanupExecError(err)
		}
		out[name] = strings.ReplaceAll(buf.String(), "<no value>", "")
	}
	return out, nil
}

// cleanupExecError: helm shows a required failure as "execution error at (<where>): <message>".
func cleanupExecError(err error) error {
	if _, ok := err.(template.ExecError); !ok {
		return err
	}
	tokens := strings.SplitN(err.Error(), ": ", 3)
	if len(tokens) == 3 {
		if parts := warnRegex.FindStringSubmatch(tokens[2]); len(parts) >= 2 {
			return fmt.Errorf("execution error at (%s): %s", tokens[1], parts[1])
		}
	}
	return err
}

// coalesce: the user's values over the chart's values.yaml (chartutil.CoalesceValues): maps
// merge key by key and a user null deletes the key; a map and a scalar for the same key: the
// user's value stays, with helm's warning.
func coalesce(user, chart map[string]interface{}) map[string]interface{} {
	for key, val := range chart {
		uv, ok := user[key]
		if !ok {
			user[key] = val
		} else if uv == nil {
			delete(user, key)
		} else if cm, ok := val.(map[string]interface{}); ok {
			if um, ok := uv.(map[string]interface{}); ok {
				coalesce(um, cm)
			} else {
				fmt.Fprintf(os.Stderr, "warning: cannot overwrite table with non table for %s (%v)\n", key, val)
			}
		} else if _, ok := uv.(map[string]interface{}); ok && val != nil {
			fmt.Fprintf(os.Stderr, "warning: destination for %s is a table. Ignoring non-table value (%v)\n", key, val)
		}
	}
	for key, val := range user {
		if val == nil {
			delete(user, key)
		}
	}
	return user
}

// mergeMaps: several -f/--set sources, later ones winning, maps merged deeply (helm's
// cli/values.mergeMaps).
func mergeMaps(a, b map[string]interface{}) map[string]interface{} {
	out := make(map[string]interface{}, len(a))
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		if vm, ok := v.(map[string]interface{}); ok {
			if om, ok := out[k].(map[string]interface{}); ok {
				out[k] = mergeMaps(om, vm)
				continue
			}
		}
		out[k] = v
	}
	return out
}

// parseSet: --set a.b=v,c=w with escaped dots (a\.b) in keys (helm's strvals, without lists).
// Like helm, a value is a bool for true/false, nil for null, an int64 if it parses as one (a
// leading zero keeps a string), else a string. A values file's numbers, by contrast, are
// float64: sigs.k8s.io/yaml reads YAML through JSON.
func parseSet(s string, into map[string]interface{}) error {
	for _, assign := range strings.Split(s, ",") {
		eq := strings.Index(assign, "=")
		if eq < 0 {
			return fmt.Errorf("key %q has no value", assign)
		}
		var keys []string
		var cur strings.Builder
		for i, k := 0, assign[:eq]; i < len(k); i++ {
			if k[i] == '\\' && i+1 < len(k) {
				i++
				cur.WriteByte(k[i])
			} else if k[i] == '.' {
				keys = append(keys, cur.String())
				cur.Reset()
			} else {
				cur.WriteByte(k[i])
			}
		}
		keys = append(keys, cur.String())
		raw := assign[eq+1:]
		var val interface{} = raw
		if strings.EqualFold(raw, "true") || strings.EqualFold(raw, "false") {
			val = strings.EqualFold(raw, "true")
		} else if strings.EqualFold(raw, "null") {
			val = nil
		} else if n, err := strconv.ParseInt(raw, 10, 64); err == nil && (raw == "0" || raw[0] != '0') {
			val = n
		}
		m := into
		for _, k := range keys[:len(keys)-1] {
			sub, ok := m[k].(map[string]interface{})
			if !ok {
				sub = map[string]interface{}{}
				m[k] = sub
			}
			m = sub
		}
		m[keys[len(keys)-1]] = val
	}
	return nil
}

func die(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "Error: "+format+"\n", a...)
	os.Exit(1)
}

func readYAML(file string, into interface{}) {
	b, err := os.ReadFile(file)
	if err != nil {
		die("%v", err)
	}
	if err := yaml.Unmarshal(b, into); err != nil {
		die("failed to parse %s: %v", file, err)
	}
}

// A rendered file holds documents separated by "---" lines (helm's releaseutil.SplitManifests).
var separator = regexp.MustCompile(`(?:^|\s*\n)---\s*`)

func main() {
	if len(os.Args) < 2 {
		die("usage: chart-render CHART_DIR [-f values.yaml] [--set k=v] [--name R] [--namespace NS]")
	}
	chartDir := os.Args[1]
	release, namespace := "larder", "default"
	user := map[string]interface{}{}
	args := os.Args[2:]
	for i := 0; i < len(args); i += 2 {
		if i+1 >= len(args) {
			die("%s needs a value", args[i])
		}
		switch a, next := args[i], args[i+1]; a {
		case "--set":
			set := map[string]interface{}{}
			if err := parseSet(next, set); err != nil {
				die("failed parsing --set data: %v", err)
			}
			user = mergeMaps(user, set)
		case "-f", "--values":
			file := map[string]interface{}{}
			readYAML(next, &file)
			user = mergeMaps(user, file)
		case "--name":
			release = next
		case "--namespace", "-n":
			namespace = next
		default:
			die("unknown argument %q", a)
		}
	}

	var meta Metadata
	readYAML(filepath.Join(chartDir, "Chart.yaml"), &meta)
	defaults := map[string]interface{}{}
	readYAML(filepath.Join(chartDir, "values.yaml"), &defaults)

	files, templates := Files{}, map[string]string{}
	err := filepath.Walk(chartDir, func(p string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(chartDir, p)
		rel = filepath.ToSlash(rel)
		data, err := os.ReadFile(p)
		if strings.HasPrefix(rel, "templates/") {
			templates[path.Join(meta.Name, rel)] = string(data) // named as helm names them
		} else if rel != "Chart.yaml" && rel != "values.yaml" {
			files[rel] = data
		}
		return err
	})
	if err != nil {
		die("%v", err)
	}

	top := map[string]interface{}{
		"Chart":  &meta,
		"Files":  files,
		"Values": coalesce(user, defaults),
		"Release": map[string]interface{}{
			"Name": release, "Namespace": namespace, "Revision": 1,
			"IsUpgrade": false, "IsInstall": true, "Service": "Helm",
		},
		"Capabilities": &Capabilities{
			KubeVersion: map[string]string{"Version": "v1.28.0", "Major": "1", "Minor": "28"},
			APIVersions: []string{"v1", "apps/v1", "policy/v1", "networking.k8s.io/v1"},
			HelmVersion: map[string]string{"Version": "v3.14.0"},
		},
	}
	out, err := render(templates, top)
	if err != nil {
		die("%v", err)
	}
	names := make([]string, 0, len(out))
	for name := range out {
		names = append(names, name)
	}
	sort.Strings(names)
	var w strings.Builder
	for _, name := range names {
		if strings.HasSuffix(name, "NOTES.txt") { // rendered (errors count), never printed
			continue
		}
		for _, doc := range separator.Split(out[name], -1) {
			if strings.TrimSpace(doc) != "" {
				fmt.Fprintf(&w, "---\n# Source: %s\n%s\n", name, doc)
			}
		}
	}
	os.Stdout.WriteString(w.String())
}
