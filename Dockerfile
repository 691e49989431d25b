# A small image: the official slim Python on Alpine plus h11 and pyyaml, nothing else.
FROM python:3.13-alpine

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    CONFIG_DIR=/data \
    LOG_LEVEL=info

RUN pip install --no-cache-dir h11==0.16.0 PyYAML==6.0.3 \
 && adduser -D -H -u 10001 poe \
 && mkdir -p /data /app \
 && chown poe /data

WORKDIR /app
COPY poe2openai.py adminpage.html /app/
COPY --chown=poe models.yaml /data/models.yaml
# Byte-code compiled once here: `python -m` then starts from it (faster, and about 10 MB less memory
# than compiling the source at every start; PYTHONDONTWRITEBYTECODE only stops writing at run time).
RUN python -m compileall -q /app

USER poe
VOLUME /data
EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=4)"]

# Exec form: the server is PID 1 and receives SIGTERM directly.
CMD ["python", "-m", "poe2openai"]
