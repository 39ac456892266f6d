{{/*
The training Job: one definition for the template `loraplane train submit` instantiates and for the
initial run. Arguments: root (the chart's context), name (the Job's name), runConfig (the ConfigMap
holding train.yaml), ttl (ttlSecondsAfterFinished, or nil for none), jobset (true: the child Job of
loraplane-trainer.run's JobSet). Exit codes
(trainer/exit_codes.py): 2 = do not retry (FailJob at once), 75 = preempted with a checkpoint saved
(retried; the next pod resumes); a pod disrupted by eviction or preemption is not counted. Multi-node
(trainer.nodes > 1): 76 = this pod lost pod 0, the rendezvous host (not counted: every pod is
replaced and the gang resumes; trainer/elastic.py, docs/training.md "Multi-node runs").
*/}}
{{- define "loraplane-trainer.job" -}}
{{- $root := .root }}
{{- $t := $root.Values }}
{{- $fullname := include "loraplane-trainer.fullname" $root }}
{{- $multi := gt (int $t.nodes) 1 }}
{{- $jobset := and $multi .jobset }}
{{- $gang := $t.gang | default dict }}
{{- $m := mergeOverwrite (dict "hfToken" dict "s3" dict) (deepCopy ((($root.Values.global).models) | default dict)) }}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ .name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "loraplane-trainer.labels" $root | nindent 4 }}
    app.kubernetes.io/component: trainer
    {{- with ($t.kueue).queueName }}
    {{- if not $jobset }}
    # Kueue admits the Job as one workload (all pods or none); its webhook creates it suspended.
    kueue.x-k8s.io/queue-name: {{ . }}
    {{- end }}
    {{- end }}
  annotations:
    checkov.io/skip1: CKV_K8S_11=No CPU limit on purpose - throttling slows data loading and NCCL; requests are the contract
    checkov.io/skip2: CKV_K8S_43=Images are pinned by tag from values; set trainer.image.tag to a digest-pinned tag in production
    checkov.io/skip3: CKV_K8S_15=IfNotPresent - multi-GB images are not pulled again for every run; tags are immutable
    checkov.io/skip4: CKV_K8S_13=The memory limit depends on the model and batch - set trainer.resources for yours
spec:
  {{- if $jobset }}
  # A child Job of the JobSet: any counted pod failure fails it, and the JobSet recreates every
  # child Job (the gang restarts; failurePolicy.maxRestarts is trainer.backoffLimit).
  backoffLimit: 0
  {{- else }}
  backoffLimit: {{ $t.backoffLimit }}
  {{- end }}
  {{- if $t.activeDeadlineSeconds }}
  activeDeadlineSeconds: {{ $t.activeDeadlineSeconds }}
  {{- end }}
  {{- if not (kindIs "invalid" .ttl) }}
  ttlSecondsAfterFinished: {{ .ttl }}
  {{- end }}
  {{- if $multi }}
  # All nodes of a run start together; pod i gets JOB_COMPLETION_INDEX=i and the hostname NAME-i.
  completionMode: Indexed
  completions: {{ $t.nodes }}
  parallelism: {{ $t.nodes }}
  {{- end }}
  # A replacement pod starts only once the old one is gone (stable hostnames for the rendezvous).
  podReplacementPolicy: Failed
  podFailurePolicy:
    rules:
      - action: FailJob
        onExitCodes: {containerName: trainer, operator: In, values: [2]}
      {{- if $multi }}
      # 76: this pod lost the rendezvous host (pod 0 is gone, its c10d store with it) after it had
      # joined; pod 0's own failure is counted (or not) by its own exit code or condition.
      - action: Ignore
        onExitCodes: {containerName: trainer, operator: In, values: [76]}
      {{- end }}
      - action: Ignore
        onPodConditions: [{type: DisruptionTarget}]
  template:
    metadata:
      labels:
        {{- include "loraplane-trainer.podLabels" $root | nindent 8 }}
        app.kubernetes.io/component: trainer
      {{- with $t.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      restartPolicy: Never
      serviceAccountName: {{ $fullname }}-trainer
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: {{ $t.terminationGracePeriodSeconds }}
      {{- if and $multi (not $jobset) }}
      subdomain: {{ $fullname }}-trainer
      {{- end }}
      {{- with $root.Values.global.runtimeClassName }}
      runtimeClassName: {{ . }}
      {{- end }}
      {{- with $t.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      securityContext:
        runAsNonRoot: true
        runAsUser: 10001
        fsGroup: 10001
        # Chown the volume only when its root is not already the fsGroup's (not every file, every run).
        fsGroupChangePolicy: OnRootMismatch
        seccompProfile: {type: RuntimeDefault}
      {{- with $root.Values.global.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: trainer
          image: "{{ $t.image.repository }}:{{ $t.image.tag | default $root.Chart.AppVersion }}"
          imagePullPolicy: {{ $t.image.pullPolicy }}
          {{- if $multi }}
          # torchrun's elastic agent (trainer/elastic.py): c10d rendezvous hosted by pod 0, all
          # `nodes` in every round; a lost pod restarts every worker from the newest checkpoint.
          command:
            - python
            - -m
            - loraplane.trainer.elastic
            - --nnodes={{ $t.nodes }}
            - --nproc-per-node={{ $t.gpusPerNode }}
            - --rdzv-backend=c10d
            - --rdzv-endpoint=$(MASTER_ADDR):{{ $t.rendezvousPort }}
            - --rdzv-id=$(RUN_NAME)
            - --rdzv-conf=join_timeout={{ int ($gang.joinTimeout | default 600) }}
            - --max-restarts={{ int ($gang.maxRestarts | default 0) }}
            - -m
            - loraplane.trainer
            - --config
            - /etc/loraplane/run/train.yaml
          {{- else if gt (int $t.gpusPerNode) 1 }}
          command: [torchrun, --standalone, --nproc-per-node={{ $t.gpusPerNode }}, -m, loraplane.trainer, --config, /etc/loraplane/run/train.yaml]
          {{- else }}
          command: [python, -m, loraplane.trainer, --config, /etc/loraplane/run/train.yaml]
          {{- end }}
          env:
            - {name: HOME, value: /tmp}
            - {name: HF_HOME, value: {{ include "loraplane-trainer.mountPath" $root }}/hf-cache}
            - {name: LORAPLANE_LOG_FORMAT, value: json}
            # an hf:// or s3:// base_model.path is fetched here (once; the model-fetch Job's place)
            - {name: LORAPLANE_MODELS_ROOT, value: {{ include "loraplane-trainer.mountPath" $root }}/{{ (($root.Values.global).models).root | default "models" | trimAll "/" }}}
            {{- with $m.hfToken.secretName }}
            # the hub token as a mounted file (huggingface_hub reads HF_TOKEN_PATH), never an env value
            - {name: HF_TOKEN_PATH, value: /etc/loraplane/hf-token/{{ $m.hfToken.key | default "token" }}}
            {{- end }}
            {{- with $m.s3.endpointUrl }}
            - {name: AWS_ENDPOINT_URL, value: {{ . | quote }}}
            {{- end }}
            {{- with $m.s3.region }}
            - {name: AWS_REGION, value: {{ . | quote }}}
            {{- end }}
            {{- if or $multi (gt (int $t.gpusPerNode) 1) }}
            # torchrun's agent gives its workers this long to save after SIGTERM (its default is 30 s)
            - {name: TORCH_ELASTIC_SHUTDOWN_TIMEOUT, value: {{ sub (int $t.terminationGracePeriodSeconds) 15 | quote }}}
            {{- end }}
            {{- if $jobset }}
            - name: RUN_NAME
              valueFrom:
                fieldRef: {fieldPath: "metadata.labels['jobset.sigs.k8s.io/jobset-name']"}
            # Pod 0's stable DNS name (JobSet's headless Service: JOBSET-REPLICATEDJOB-JOBINDEX-PODINDEX).
            - {name: MASTER_ADDR, value: "$(RUN_NAME)-node-0-0.$(RUN_NAME).{{ $root.Release.Namespace }}.svc"}
            {{- else if $multi }}
            - name: RUN_NAME
              valueFrom:
                fieldRef: {fieldPath: "metadata.labels['batch.kubernetes.io/job-name']"}
            # Pod 0's stable DNS name (hostname NAME-0 under the headless Service).
            - {name: MASTER_ADDR, value: "$(RUN_NAME)-0.{{ $fullname }}-trainer.{{ $root.Release.Namespace }}.svc"}
            {{- end }}
            {{- if $multi }}
            - {name: MASTER_PORT, value: {{ $t.rendezvousPort | quote }}}
            - {name: NNODES, value: {{ $t.nodes | quote }}}
            {{- end }}
            {{- if ($t.metrics).enabled }}
            # loss, learning rate, throughput on /metrics (rank 0 serves them; trainer/metrics.py)
            - {name: LORAPLANE_TRAINER_METRICS_PORT, value: {{ $t.metrics.port | quote }}}
            {{- end }}
          {{- with $m.s3.credentialsSecret }}
          # AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for s3:// models and data
          envFrom:
            - secretRef: {name: {{ . }}}
          {{- end }}
          {{- if or $multi ($t.metrics).enabled }}
          ports:
            {{- if $multi }}
            - {name: rendezvous, containerPort: {{ $t.rendezvousPort }}}
            {{- end }}
            {{- if ($t.metrics).enabled }}
            - {name: metrics, containerPort: {{ $t.metrics.port }}}
            {{- end }}
          {{- end }}
          resources:
            {{- toYaml $t.resources | nindent 12 }}
          securityContext:
            {{- include "loraplane-trainer.containerSecurityContext" $root | nindent 12 }}
          volumeMounts:
            - {name: data, mountPath: {{ include "loraplane-trainer.mountPath" $root }}}
            - {name: run-config, mountPath: /etc/loraplane/run, readOnly: true}
            - {name: tmp, mountPath: /tmp}
            - {name: shm, mountPath: /dev/shm}
            {{- if $m.hfToken.secretName }}
            - {name: hf-token, mountPath: /etc/loraplane/hf-token, readOnly: true}
            {{- end }}
      volumes:
        - name: data
          persistentVolumeClaim:
            claimName: {{ include "loraplane-trainer.claimName" $root }}
        - name: run-config
          configMap: {name: {{ .runConfig }}}
        - name: tmp
          emptyDir: {}
        - name: shm
          emptyDir: {medium: Memory, sizeLimit: {{ $t.shmSize }}}
        {{- with $m.hfToken.secretName }}
        - name: hf-token
          secret: {secretName: {{ . }}}
        {{- end }}
      {{- with $t.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $t.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with include "loraplane-trainer.affinity" $root }}
      affinity:
        {{- . | nindent 8 }}
      {{- end }}
{{- end -}}


{{/*
A run as `loraplane train submit` instantiates it (the template ConfigMap): the Job above or, for a
multi-node run with trainer.gang.backend=jobset (or auto on a cluster that serves JobSet's API), a
JobSet whose one replicated Job is that Job. JobSet restarts the gang by recreating every child Job
when one fails (failurePolicy.maxRestarts = trainer.backoffLimit); exit 2 (PodFailurePolicy) fails
the JobSet at once. Same arguments as loraplane-trainer.job.
*/}}
{{- define "loraplane-trainer.jobset" -}}
{{- $t := .root.Values }}
{{- $backend := ($t.gang).backend | default "auto" }}
{{- if and (gt (int $t.nodes) 1) (or (eq $backend "jobset") (and (eq $backend "auto") (.root.Capabilities.APIVersions.Has "jobset.x-k8s.io/v1alpha2/JobSet"))) }}true{{ end }}
{{- end -}}

{{- define "loraplane-trainer.run" -}}
{{- $root := .root }}
{{- $t := $root.Values }}
{{- if not (include "loraplane-trainer.jobset" .) }}
{{- include "loraplane-trainer.job" . }}
{{- else }}
{{- $job := include "loraplane-trainer.job" (dict "root" .root "name" .name "runConfig" .runConfig "ttl" nil "jobset" true) | fromYaml }}
apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: {{ .name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "loraplane-trainer.labels" $root | nindent 4 }}
    app.kubernetes.io/component: trainer
    {{- with ($t.kueue).queueName }}
    # Kueue admits the JobSet as one workload (every pod or none); its webhook creates it suspended.
    kueue.x-k8s.io/queue-name: {{ . }}
    {{- end }}
  annotations:
    {{- toYaml $job.metadata.annotations | nindent 4 }}
spec:
  {{- if not (kindIs "invalid" .ttl) }}
  ttlSecondsAfterFinished: {{ .ttl }}
  {{- end }}
  # Pod i of the run is NAME-node-0-i under a headless Service named NAME (JobSet creates it).
  network: {enableDNSHostnames: true, publishNotReadyAddresses: true}
  failurePolicy:
    maxRestarts: {{ $t.backoffLimit }}
    rules:
      - name: do-not-retry
        action: FailJobSet
        onJobFailureReasons: [PodFailurePolicy]
  replicatedJobs:
    - name: node
      replicas: 1
      template:
        metadata:
          labels:
            app.kubernetes.io/component: trainer
        spec:
          {{- toYaml $job.spec | nindent 10 }}
{{- end }}
{{- end -}}
