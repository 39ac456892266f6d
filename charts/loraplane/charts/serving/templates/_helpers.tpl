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
the node's hostname to the release's pods that mount the shared volume (vLLM, trainer, the
model-fetch Job, `evals submit`'s eval pods and the CLI's `volume put` pod): a ReadWriteOnce volume
attaches to one node only. The first such pod lands anywhere (a pod matching its own term is
schedulable while no other matches), the others follow it. The same term in the trainer's and
serving's helpers (the eval pods use serving's volumeAffinity): change both.
*/}}
{{- define "loraplane-serving.affinity" -}}
{{- $affinity := deepCopy (.Values.affinity | default dict) -}}
{{- if ((.Values.global).storage).singleNode -}}
{{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchLabels" (dict "app.kubernetes.io/instance" .Release.Name) "matchExpressions" (list (dict "key" "app.kubernetes.io/component" "operator" "In" "values" (list "vllm" "trainer" "volume-put" "model-fetch" "eval")))) -}}
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

{{/*
The base model as a reference the model-fetch Job downloads ("" when serving.model is a directory on
the volume): hf://ORG/NAME[@REV] and s3://BUCKET/PREFIX as they are, a bare hub id with
modelSource hub as hf://ID. Refused at render when it is none of these (the same rules as
loraplane.common.model_ref).
*/}}
{{- define "loraplane-serving.modelRef" -}}
{{- $s := .Values -}}
{{- $mount := include "loraplane-serving.mountPath" . -}}
{{- $model := $s.model | trim -}}
{{- if or (hasPrefix "hf://" $model) (hasPrefix "s3://" $model) -}}
{{- if not (or (regexMatch "^hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9][A-Za-z0-9._/-]{0,254})?$" $model) (regexMatch "^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9._-]+)+/?$" $model)) -}}
{{- fail (printf "serving.model %q is not a model reference loraplane can fetch: write hf://ORG/NAME@REVISION (e.g. hf://Qwen/Qwen2.5-0.5B-Instruct@main) or s3://BUCKET/PREFIX (the prefix holding config.json), or a directory on the volume (e.g. %s/models/base)" $model $mount) -}}
{{- end -}}
{{- $model -}}
{{- else if hasPrefix "/" $model -}}
{{- else if eq $s.modelSource "hub" -}}
{{- if not (regexMatch "^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$" $model) -}}
{{- fail (printf "serving.model %q is not a hub id (ORG/NAME); with serving.modelSource=hub write ORG/NAME, or hf://ORG/NAME@REVISION" $model) -}}
{{- end -}}
{{- printf "hf://%s" $model -}}
{{- else -}}
{{- fail (printf "serving.model %q is neither a directory on the shared volume (e.g. %s/models/base) nor a reference to fetch (hf://ORG/NAME@REVISION, s3://BUCKET/PREFIX)" $model $mount) -}}
{{- end -}}
{{- end -}}

{{/* Where hf:// and s3:// models are fetched to: global.models.root below the volume's mount. */}}
{{- define "loraplane-serving.modelsRoot" -}}
{{- printf "%s/%s" (include "loraplane-serving.mountPath" .) ((((.Values.global).models).root) | default "models" | trimAll "/") -}}
{{- end -}}

{{/* With global.storage.singleNode, only the pod affinity that holds a volume user on the volume's node. */}}
{{- define "loraplane-serving.volumeAffinity" -}}
{{- if ((.Values.global).storage).singleNode -}}
podAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels: {app.kubernetes.io/instance: {{ .Release.Name }}}
        matchExpressions:
          - {key: app.kubernetes.io/component, operator: In, values: [vllm, trainer, volume-put, model-fetch, eval]}
{{- end -}}
{{- end -}}

{{/*
The model-fetch Job's pod template (model-fetch.yaml hashes it into the Job's name). Arguments: root,
ref, hfSecret/hfKey (the hub token Secret), s3 (global.models.s3), mount.
*/}}
{{- define "loraplane-serving.modelFetchPod" -}}
{{- $root := .root }}
{{- $s := $root.Values }}
metadata:
  labels:
    {{- include "loraplane-serving.podLabels" $root | nindent 4 }}
    app.kubernetes.io/component: model-fetch
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  securityContext:
    runAsNonRoot: true
    runAsUser: 10001
    fsGroup: 10001
    fsGroupChangePolicy: OnRootMismatch
    seccompProfile: {type: RuntimeDefault}
  {{- with $root.Values.global.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: fetch
      image: "{{ $s.image.repository }}:{{ $s.image.tag | default $root.Chart.AppVersion }}"
      imagePullPolicy: {{ $s.image.pullPolicy }}
      command:
        - python
        - -m
        - loraplane.common.model_fetch
        - {{ .ref | quote }}
        - --models-root={{ include "loraplane-serving.modelsRoot" $root }}
        - --field=serving.model
      # the reason of a failure (a wrong id, no token, a denied bucket) is the pod's termination message
      terminationMessagePolicy: FallbackToLogsOnError
      env:
        - {name: HOME, value: /tmp}
        - {name: HF_HOME, value: /tmp/hf}
        # the image is offline by default (vLLM and training never download); this pod's job is to
        - {name: HF_HUB_OFFLINE, value: "0"}
        - {name: LORAPLANE_LOG_FORMAT, value: json}
        {{- if .hfSecret }}
        # the hub token as a mounted file (huggingface_hub reads HF_TOKEN_PATH), never an env value
        - {name: HF_TOKEN_PATH, value: /etc/loraplane/hf-token/{{ .hfKey }}}
        {{- end }}
        {{- with .s3.endpointUrl }}
        - {name: AWS_ENDPOINT_URL, value: {{ . | quote }}}
        {{- end }}
        {{- with .s3.region }}
        - {name: AWS_REGION, value: {{ . | quote }}}
        {{- end }}
        {{- with $s.modelFetch.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with .s3.credentialsSecret }}
      # AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) from the Secret
      envFrom:
        - secretRef: {name: {{ . }}}
      {{- end }}
      resources:
        {{- toYaml $s.modelFetch.resources | nindent 8 }}
      securityContext:
        {{- include "loraplane-serving.containerSecurityContext" $root | nindent 8 }}
      volumeMounts:
        - {name: data, mountPath: {{ .mount }}}
        - {name: tmp, mountPath: /tmp}
        {{- if .hfSecret }}
        - {name: hf-token, mountPath: /etc/loraplane/hf-token, readOnly: true}
        {{- end }}
  volumes:
    - name: data
      persistentVolumeClaim:
        claimName: {{ include "loraplane-serving.claimName" $root }}
    - name: tmp
      emptyDir: {}
    {{- with .hfSecret }}
    - name: hf-token
      secret: {secretName: {{ . }}}
    {{- end }}
  {{- with include "loraplane-serving.volumeAffinity" $root }}
  affinity:
    {{- . | nindent 4 }}
  {{- end }}
{{- end -}}
