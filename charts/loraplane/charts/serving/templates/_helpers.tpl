{{/*
Names are the umbrella chart's, computed from `global` so that the parent and every subchart agree:
RELEASE-loraplane-<part> (or global.fullnameOverride-<part>). Truncated at 63 characters (DNS labels).
Helpers carry this chart's prefix: named templates are global across the parent and its subcharts.
*/}}
{{- define "loraplane-serving.name" -}}
{{- (.Values.global).nameOverride | default "loraplane" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "loraplane-serving.fullname" -}}
{{- $name := include "loraplane-serving.name" . -}}
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
Pod templates carry only loraplane-serving.podLabels (+ component): a label that changes with every chart
release (helm.sh/chart, app.kubernetes.io/version) would roll every pod on an upgrade that changes
nothing else about it.
*/}}
{{- define "loraplane-serving.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "loraplane-serving.podLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}
{{- define "loraplane-serving.podLabels" -}}
app.kubernetes.io/name: {{ include "loraplane-serving.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: loraplane
{{- end -}}

{{/* The shared volume (the parent chart creates it, or the user's existing claim). */}}
{{- define "loraplane-serving.claimName" -}}
{{- ((.Values.global).storage).existingClaim | default (printf "%s-data" (include "loraplane-serving.fullname" .)) -}}
{{- end -}}
{{- define "loraplane-serving.mountPath" -}}
{{- ((.Values.global).storage).mountPath | default "/data" -}}
{{- end -}}

{{/*
The pod's affinity: serving.affinity, plus with global.storage.singleNode a required pod affinity on
the node's hostname to the release's pods that mount the shared volume (vLLM, trainer, and the
CLI's `volume put` pod): a ReadWriteOnce volume attaches to one node only. The first such pod lands
anywhere (a pod matching its own term is schedulable while no other matches), the others follow it.
The same term in the trainer's and serving's helpers: change both.
*/}}
{{- define "loraplane-serving.affinity" -}}
{{- $affinity := deepCopy (.Values.affinity | default dict) -}}
{{- if ((.Values.global).storage).singleNode -}}
{{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchLabels" (dict "app.kubernetes.io/instance" .Release.Name) "matchExpressions" (list (dict "key" "app.kubernetes.io/component" "operator" "In" "values" (list "vllm" "trainer" "volume-put")))) -}}
{{- $pod := $affinity.podAffinity | default dict -}}
{{- $_ := set $pod "requiredDuringSchedulingIgnoredDuringExecution" (append ($pod.requiredDuringSchedulingIgnoredDuringExecution | default list) $term) -}}
{{- $_ := set $affinity "podAffinity" $pod -}}
{{- end -}}
{{- with $affinity }}{{ toYaml . }}{{ end -}}
{{- end -}}

{{/* Pod Security Standard "restricted": what every container of the platform runs with. */}}
{{- define "loraplane-serving.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
One entry of serving.extraArgs, refused when it sets a flag the chart sets from its own values
(serving/launcher.py OWNED_FLAGS and OPTIONAL_FLAGS): vLLM would take the last value and silently
override the typed value.
*/}}
{{- define "loraplane-serving.extraArg" -}}
{{- $owned := list "--model" "--served-model-name" "--host" "--port" "--api-key" "--enable-lora" "--lora-modules" "--max-loras" "--max-lora-rank" "--max-cpu-loras" "--max-model-len" "--max-num-seqs" "--dtype" "--shutdown-timeout" "--disable-uvicorn-access-log" "--tensor-parallel-size" "-tp" "--gpu-memory-utilization" "--enable-prefix-caching" "--no-enable-prefix-caching" -}}
{{- $flag := regexReplaceAll "^--([^=]*).*$" (toString .) "${1}" | replace "_" "-" -}}
{{- $flag = ternary (printf "--%s" $flag) (toString . | splitList "=" | first) (hasPrefix "--" (toString .)) -}}
{{- if has $flag $owned -}}
{{- fail (printf "serving.extraArgs: %q sets %s, which the chart sets from its own values; set the matching serving value instead (see the chart README)" (toString .) $flag) -}}
{{- end -}}
{{- . -}}
{{- end -}}
