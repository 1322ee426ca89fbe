{{- define "larder.name" -}}{{ .Chart.Name }}{{- end -}}

{{- define "larder.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "larder.labels" -}}
app.kubernetes.io/name: {{ include "larder.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "larder.selector" -}}
app.kubernetes.io/name: {{ include "larder.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "larder.storage" -}}
{{- if eq .Values.storage.mode "s3" -}}
s3://{{ required "storage.s3.bucket is required in s3 mode" .Values.storage.s3.bucket }}{{ if .Values.storage.s3.prefix }}/{{ .Values.storage.s3.prefix }}{{ end }}
{{- else if eq .Values.storage.mode "disk" -}}
/var/lib/larder
{{- else -}}
{{- fail "storage.mode must be disk or s3" -}}
{{- end -}}
{{- end -}}

{{- /* A setting as an environment string. helm reads the numbers of a values file as float64,
     which print as 1e+06 from 1000000 (and larder refuses that size); toJson prints them whole. */ -}}
{{- define "larder.env" -}}
{{- if kindIs "float64" . -}}{{ toJson . }}{{- else -}}{{ . }}{{- end -}}
{{- end -}}
