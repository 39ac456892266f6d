{{/*
Names are the umbrella chart's, computed from `global` so that the parent and every subchart agree:
RELEASE-loraplane-<part> (or global.fullnameOverride-<part>). Truncated at 63 characters (DNS labels).
Helpers carry this chart's prefix: named templates are global across the parent and its subcharts.
*/}}
{{- define "loraplane.name" -}}
{{- (.Values.global).nameOverride | default "loraplane" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "loraplane.fullname" -}}
{{- $name := include "loraplane.name" . -}}
{{- if (.Values.global).fullnameOverride -}}
{{- .Values.global.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/*
Labels on every object's metadata; selectors use only instance + component (immutable after creation).
Pod templates carry only loraplane.podLabels (+ component): a label that changes with every chart
release (helm.sh/chart, app.kubernetes.io/version) would roll every pod on an upgrade that changes
nothing else about it.
*/}}
{{- define "loraplane.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "loraplane.podLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}
{{- define "loraplane.podLabels" -}}
app.kubernetes.io/name: {{ include "loraplane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: loraplane
{{- end -}}

{{/* The shared volume (the parent chart creates it, or the user's existing claim). */}}
{{- define "loraplane.claimName" -}}
{{- ((.Values.global).storage).existingClaim | default (printf "%s-data" (include "loraplane.fullname" .)) -}}
{{- end -}}
{{- define "loraplane.mountPath" -}}
{{- ((.Values.global).storage).mountPath | default "/data" -}}
{{- end -}}

{{/* Pod Security Standard "restricted": what every container of the platform runs with. */}}
{{- define "loraplane.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
