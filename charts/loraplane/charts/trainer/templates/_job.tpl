{{/*
The training Job: one definition for the template `loraplane train submit` instantiates and for the
initial run. Arguments: root (the chart's context), name (the Job's name), runConfig (the ConfigMap
holding train.yaml), ttl (ttlSecondsAfterFinished, or nil for none). Exit codes
(trainer/exit_codes.py): 2 = do not retry (FailJob at once), 75 = preempted with a checkpoint saved
(retried; the next pod resumes); a pod disrupted by eviction or preemption is not counted.
*/}}
{{- define "loraplane-trainer.job" -}}
{{- $root := .root }}
{{- $t := $root.Values }}
{{- $fullname := include "loraplane-trainer.fullname" $root }}
{{- $multi := gt (int $t.nodes) 1 }}
{{- $m := mergeOverwrite (dict "hfToken" dict "s3" dict) (deepCopy ((($root.Values.global).models) | default dict)) }}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ .name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "loraplane-trainer.labels" $root | nindent 4 }}
    app.kubernetes.io/component: trainer
  annotations:
    checkov.io/skip1: CKV_K8S_11=No CPU limit on purpose - throttling slows data loading and NCCL; requests are the contract
    checkov.io/skip2: CKV_K8S_43=Images are pinned by tag from values; set trainer.image.tag to a digest-pinned tag in production
    checkov.io/skip3: CKV_K8S_15=IfNotPresent - multi-GB images are not pulled again for every run; tags are immutable
    checkov.io/skip4: CKV_K8S_13=The memory limit depends on the model and batch - set trainer.resources for yours
spec:
  backoffLimit: {{ $t.backoffLimit }}
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
      {{- if $multi }}
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
          command:
            - torchrun
            - --nnodes={{ $t.nodes }}
            - --nproc-per-node={{ $t.gpusPerNode }}
            - --node-rank=$(JOB_COMPLETION_INDEX)
            - --master-addr=$(MASTER_ADDR)
            - --master-port={{ $t.rendezvousPort }}
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
            {{- if $multi }}
            - name: JOB_NAME
              valueFrom:
                fieldRef: {fieldPath: "metadata.labels['batch.kubernetes.io/job-name']"}
            # Pod 0's stable DNS name (hostname NAME-0 under the headless Service).
            - {name: MASTER_ADDR, value: "$(JOB_NAME)-0.{{ $fullname }}-trainer.{{ $root.Release.Namespace }}.svc"}
            - {name: MASTER_PORT, value: {{ $t.rendezvousPort | quote }}}
            - {name: NNODES, value: {{ $t.nodes | quote }}}
            {{- end }}
          {{- with $m.s3.credentialsSecret }}
          # AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for s3:// models and data
          envFrom:
            - secretRef: {name: {{ . }}}
          {{- end }}
          {{- if $multi }}
          ports:
            - {name: rendezvous, containerPort: {{ $t.rendezvousPort }}}
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
